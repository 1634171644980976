//! The CLI's commands (except argument parsing, which lives in `main.rs`): each returns the text
//! to print on stdout so tests can check it.
//!
//! Owns: human output (aligned tables) and `--json` output shapes. Never prints secret values or
//! the API token.

use crate::api::{AgentView, AuditView};
use crate::client::{ApiClient, ClientError};
use crate::config::DataDir;
use crate::init::{InitError, InitOptions};
use thiserror::Error;

/// A failed command: the message printed to stderr before a non-zero exit.
#[derive(Debug, Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

/// `delegate-cp init`.
pub fn init(dd: &DataDir, opts: &InitOptions) -> Result<String, CliError> {
    let report = crate::init::init(dd, opts)?;
    let mut out = format!(
        "initialised control plane in {}\n  agent endpoint: {}\n  user API:       {}\n",
        dd.root.display(),
        report.config.agent_listen,
        report.config.api_listen
    );
    for p in &report.agent_configs {
        out.push_str(&format!(
            "  agent bundle:   delegate run --config {}\n",
            p.display()
        ));
    }
    out.push_str(&format!(
        "start it with: delegate-cp serve --data-dir {}\n",
        dd.root.display()
    ));
    Ok(out)
}

/// `delegate-cp agents [--json]`.
pub async fn agents(client: &ApiClient, json: bool) -> Result<String, CliError> {
    let agents: Vec<AgentView> = client.get_json("/api/v1/agents").await?;
    if json {
        return Ok(to_json(&agents));
    }
    let rows = agents
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.state.clone(),
                a.version.clone(),
                a.pool.clone(),
                a.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                a.last_heartbeat.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    Ok(table(
        &[
            "NAME",
            "STATE",
            "VERSION",
            "POOL",
            "LABELS",
            "LAST HEARTBEAT",
        ],
        rows,
    ))
}

/// `delegate-cp audit [--task T] [--json]`.
pub async fn audit(client: &ApiClient, task: Option<&str>, json: bool) -> Result<String, CliError> {
    let path = match task {
        Some(t) => format!("/api/v1/audit?task={}", urlencode(t)),
        None => "/api/v1/audit".into(),
    };
    let records: Vec<AuditView> = client.get_json(&path).await?;
    if json {
        return Ok(to_json(&records));
    }
    let rows = records
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.at.clone(),
                r.who.clone(),
                r.action.clone(),
                r.target.clone(),
                r.detail.clone(),
            ]
        })
        .collect();
    Ok(table(
        &["ID", "TIME", "WHO", "ACTION", "TARGET", "DETAIL"],
        rows,
    ))
}

pub fn to_json<T: serde::Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into());
    s.push('\n');
    s
}

/// Percent-encode a query value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows.iter()) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["NAME", "STATE"],
            vec![
                vec!["a-long-name".into(), "connected".into()],
                vec!["b".into(), "disconnected".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME         STATE\na-long-name  connected\nb            disconnected\n"
        );
    }

    #[test]
    fn urlencode_query() {
        assert_eq!(urlencode("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(urlencode("6f1c-2f5e"), "6f1c-2f5e");
    }
}
