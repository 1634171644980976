//! The CLI's admin commands: `secrets set|list|rm` (through the API) and `keys rotate|reseal`
//! (through a running control plane, or directly on the data directory when none answers).
//!
//! Owns: their output. Never prints, echoes or puts into an error a secret value or key bytes.

use crate::api_admin::{SecretBody, SecretView};
use crate::cli::{table, to_json, urlencode, CliError};
use crate::client::{ApiClient, ClientError};
use crate::config::DataDir;
use crate::keys::{Offline, ResealReport, RotateReport};
use std::io::BufRead;

/// Where `secrets set` takes the value from. `Debug` never shows a value.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `--value V` (visible in the process list; prefer the others).
    Value(String),
    /// `--from-env VAR`.
    Env(String),
    /// Neither: the first line of standard input.
    Stdin,
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Value(_) => f.write_str("Value(..)"),
            SecretSource::Env(var) => write!(f, "Env({var:?})"),
            SecretSource::Stdin => f.write_str("Stdin"),
        }
    }
}

/// The secret's value from its source. `getenv` and `stdin` are injected for tests.
pub fn secret_value(
    source: &SecretSource,
    getenv: impl Fn(&str) -> Option<String>,
    stdin: &mut dyn BufRead,
) -> Result<zeroize::Zeroizing<String>, CliError> {
    let value = match source {
        SecretSource::Value(v) => v.clone(),
        SecretSource::Env(var) => getenv(var).ok_or_else(|| {
            CliError::Usage(format!(
                "--from-env {var}: environment variable {var} is not set"
            ))
        })?,
        SecretSource::Stdin => {
            let mut line = zeroize::Zeroizing::new(String::new());
            stdin.read_line(&mut line)?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    Ok(zeroize::Zeroizing::new(value))
}

fn secret_path(ws: &str, name: Option<&str>) -> String {
    let mut p = format!("/api/v1/workspaces/{}/secrets", urlencode(ws));
    if let Some(n) = name {
        p.push('/');
        p.push_str(&urlencode(n));
    }
    p
}

/// `delegate-cp secrets set WORKSPACE NAME [--from-env VAR | --value V]`.
pub async fn secrets_set(
    client: &ApiClient,
    ws: &str,
    name: &str,
    value: &str,
) -> Result<String, CliError> {
    let body = zeroize::Zeroizing::new(
        serde_json::to_vec(&SecretBody {
            value: value.to_string(),
        })
        .map_err(|e| CliError::Failed(format!("cannot encode the request: {e}")))?,
    );
    let r: serde_json::Value = client
        .put_bytes(&secret_path(ws, Some(name)), body.to_vec())
        .await?;
    let replaced = r.get("replaced").and_then(|v| v.as_bool()).unwrap_or(false);
    Ok(format!(
        "secret {name} of workspace {ws} {}\n",
        if replaced { "replaced" } else { "set" }
    ))
}

/// `delegate-cp secrets list WORKSPACE [--json]`: names only.
pub async fn secrets_list(client: &ApiClient, ws: &str, json: bool) -> Result<String, CliError> {
    let list: Vec<SecretView> = client.get_json(&secret_path(ws, None)).await?;
    if json {
        return Ok(to_json(&list));
    }
    let rows = list
        .into_iter()
        .map(|s| vec![s.name, s.updated_at])
        .collect();
    Ok(table(&["NAME", "UPDATED"], rows))
}

/// `delegate-cp secrets rm WORKSPACE NAME`.
pub async fn secrets_rm(client: &ApiClient, ws: &str, name: &str) -> Result<String, CliError> {
    let _: serde_json::Value = client.delete_json(&secret_path(ws, Some(name))).await?;
    Ok(format!("secret {name} of workspace {ws} removed\n"))
}

/// Run a key operation on the running control plane, or offline when none answers.
async fn online_or_offline<T: serde::de::DeserializeOwned>(
    dd: &DataDir,
    path: &str,
    env_key: Option<&str>,
    offline: impl FnOnce(&Offline) -> Result<T, crate::keys::KeysError>,
) -> Result<T, CliError> {
    let client = ApiClient::from_data_dir(dd)?;
    match client.post_json(path, &serde_json::json!({})).await {
        Ok(r) => Ok(r),
        Err(ClientError::Unreachable { .. }) => {
            let o = Offline::open(dd, env_key).map_err(|e| CliError::Failed(e.to_string()))?;
            offline(&o).map_err(|e| CliError::Failed(e.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// `delegate-cp keys rotate [--json]`.
pub async fn keys_rotate(
    dd: &DataDir,
    env_key: Option<&str>,
    json: bool,
) -> Result<String, CliError> {
    let r: RotateReport =
        online_or_offline(dd, "/api/v1/keys/rotate", env_key, |o| o.rotate("cli")).await?;
    if json {
        return Ok(to_json(&r));
    }
    Ok(format!(
        "new current key {} (previous {}); data sealed under older keys stays readable; \
         `delegate-cp keys reseal` re-seals it under the new key\n",
        r.key_id, r.previous
    ))
}

/// `delegate-cp keys reseal [--json]`: fails (after re-sealing everything it can) when an item
/// could not be opened.
pub async fn keys_reseal(
    dd: &DataDir,
    env_key: Option<&str>,
    json: bool,
) -> Result<String, CliError> {
    let r: ResealReport =
        online_or_offline(dd, "/api/v1/keys/reseal", env_key, |o| o.reseal("cli")).await?;
    let out = if json { to_json(&r) } else { reseal_text(&r) };
    if r.failures.is_empty() {
        Ok(out)
    } else {
        Err(CliError::Failed(format!(
            "{out}{} item(s) could not be re-sealed",
            r.failures.len()
        )))
    }
}

pub fn reseal_text(r: &ResealReport) -> String {
    let mut out = format!(
        "everything is sealed under key {}: {} blob(s) and {} database value(s) re-sealed, \
         {} and {} already current\n",
        r.key_id,
        r.blobs_resealed,
        r.values_resealed,
        r.blobs_already_current,
        r.values_already_current
    );
    if !r.failures.is_empty() {
        out = format!("re-sealed what could be under key {}\n", r.key_id);
        for f in &r.failures {
            out.push_str(&format!("  cannot re-seal: {f}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_value_sources() {
        let mut empty: &[u8] = b"";
        let v = secret_value(&SecretSource::Value("abcd".into()), |_| None, &mut empty).unwrap();
        assert_eq!(v.as_str(), "abcd");
        let v = secret_value(
            &SecretSource::Env("TOK".into()),
            |n| (n == "TOK").then(|| "from-env".to_string()),
            &mut empty,
        )
        .unwrap();
        assert_eq!(v.as_str(), "from-env");
        let err = secret_value(&SecretSource::Env("NOPE".into()), |_| None, &mut empty)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NOPE"), "{err}");
        let mut stdin: &[u8] = b"line-value\r\nsecond line\n";
        let v = secret_value(&SecretSource::Stdin, |_| None, &mut stdin).unwrap();
        assert_eq!(v.as_str(), "line-value");
    }

    #[test]
    fn reseal_text_lists_failures() {
        let mut r = ResealReport {
            key_id: "k2".into(),
            blobs_resealed: 3,
            values_resealed: 7,
            ..Default::default()
        };
        assert!(reseal_text(&r).contains("3 blob(s) and 7 database value(s)"));
        r.failures
            .push("state version 2 of workspace w: integrity check failed: x".into());
        let t = reseal_text(&r);
        assert!(
            t.contains("cannot re-seal: state version 2 of workspace w"),
            "{t}"
        );
    }
}
