//! The CLI's commands (except argument parsing, which lives in `main.rs`): each returns the text
//! to print on stdout so tests can check it.
//!
//! Owns: human output (aligned tables) and `--json` output shapes. Never prints secret values or
//! the API token.

use crate::api::{AgentView, AuditView};
use crate::api_tasks::{StateVersionView, TaskView};
use crate::client::{ApiClient, ClientError};
use crate::config::DataDir;
use crate::init::{InitError, InitOptions};
use crate::pack::PackError;
use crate::task_ops::SubmitRequest;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use delegate_protocol::Secrets;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use thiserror::Error;

/// A failed command: the message printed to stderr before a non-zero exit.
#[derive(Debug, Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// `delegate-cp submit` arguments.
#[derive(Debug, Clone, Default)]
pub struct SubmitArgs {
    pub dir: PathBuf,
    pub op: String,
    pub workspace: Option<String>,
    pub pool: Option<String>,
    /// `k=v`.
    pub vars: Vec<String>,
    pub var_files: Vec<PathBuf>,
    /// `K=V`.
    pub env: Vec<String>,
    /// `NAME=VALUE`.
    pub secrets: Vec<String>,
    /// Names of environment variables to pass as secrets.
    pub secret_env: Vec<String>,
    pub auto_approve: bool,
    pub timeout: Option<u64>,
    pub follow: bool,
    pub json: bool,
}

fn split_kv(flag: &str, s: &str) -> Result<(String, String), CliError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        // Never echo the argument: it may be a secret.
        _ => Err(CliError::Usage(format!("{flag} takes NAME=VALUE"))),
    }
}

/// Pack the directory and build the request. `getenv` reads `--secret-env` variables.
pub fn build_submit(
    args: &SubmitArgs,
    getenv: impl Fn(&str) -> Option<String>,
) -> Result<SubmitRequest, CliError> {
    let workspace = match &args.workspace {
        Some(w) => w.clone(),
        None => {
            let abs = std::fs::canonicalize(&args.dir).map_err(|source| PackError::Io {
                path: args.dir.clone(),
                source,
            })?;
            abs.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    CliError::Usage("cannot name the workspace after /; pass --workspace".into())
                })?
        }
    };
    let mut vars = BTreeMap::new();
    for v in &args.vars {
        let (k, v) = split_kv("--var", v)?;
        vars.insert(k, v);
    }
    let mut env = BTreeMap::new();
    for e in &args.env {
        let (k, v) = split_kv("--env", e)?;
        env.insert(k, v);
    }
    let mut secrets = BTreeMap::new();
    for s in &args.secrets {
        let (k, v) = split_kv("--secret", s)?;
        secrets.insert(k, v);
    }
    for name in &args.secret_env {
        let value = getenv(name).ok_or_else(|| {
            CliError::Usage(format!(
                "--secret-env {name}: environment variable {name} is not set"
            ))
        })?;
        secrets.insert(name.clone(), value);
    }
    let packed = crate::pack::pack_dir(&args.dir, &args.var_files)?;
    Ok(SubmitRequest {
        op: args.op.clone(),
        workspace,
        pool: args.pool.clone(),
        archive_b64: B64.encode(&packed.archive),
        vars,
        var_files: packed.var_files,
        env,
        secrets: Secrets(secrets),
        auto_approve: args.auto_approve,
        timeout_secs: args.timeout.unwrap_or(0),
    })
}

/// `delegate-cp submit`. With `--follow`, streams the logs (to `out`, or to `err` with `--json`)
/// and fails unless the task succeeded.
pub async fn submit(
    client: &ApiClient,
    args: &SubmitArgs,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let req = build_submit(args, |n| std::env::var(n).ok())?;
    // Check the size here: a server refusing a huge upload midway may only show a broken pipe.
    let status: crate::api::StatusView = client.get_json("/api/v1/status").await?;
    let size = (req.archive_b64.len() / 4 * 3) as u64;
    if size > status.max_archive_bytes {
        return Err(CliError::Failed(format!(
            "{} packs to about {size} bytes; the control plane accepts at most {} (max_archive_bytes in controlplane.toml; .terraformignore can leave files out)",
            args.dir.display(),
            status.max_archive_bytes
        )));
    }
    let task: TaskView = client.post_json("/api/v1/tasks", &req).await?;
    if args.json {
        writeln!(out, "{}", serde_json::json!({ "id": task.id }))?;
    } else {
        writeln!(
            out,
            "submitted task {} ({} of workspace {})",
            task.id, task.op, task.workspace
        )?;
    }
    out.flush()?;
    if args.follow {
        let view = if args.json {
            follow(client, &task.id, err).await?
        } else {
            follow(client, &task.id, out).await?
        };
        return finish_line(&view, if args.json { err } else { out });
    }
    Ok(())
}

fn finish_line(view: &TaskView, w: &mut (dyn Write + Send)) -> Result<(), CliError> {
    let outcome = view.outcome.as_deref().unwrap_or("unknown");
    let reason = view
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    writeln!(w, "task {} {outcome}{reason}", view.id)?;
    if let Some(outputs) = view.summary.as_ref().and_then(|s| s.outputs.as_ref()) {
        writeln!(
            w,
            "outputs: {}",
            serde_json::to_string_pretty(outputs).unwrap_or_default()
        )?;
    }
    w.flush()?;
    if crate::api_tasks::succeeded(view) {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "task {} {outcome}{reason}",
            view.id
        )))
    }
}

/// Stream a task's logs until it finishes; returns its final view.
pub async fn follow(
    client: &ApiClient,
    id: &str,
    out: &mut (dyn Write + Send),
) -> Result<TaskView, CliError> {
    stream_logs(client, id, true, out).await?;
    Ok(client
        .get_json(&format!("/api/v1/tasks/{}", urlencode(id)))
        .await?)
}

async fn stream_logs(
    client: &ApiClient,
    id: &str,
    follow: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let path = format!(
        "/api/v1/tasks/{}/logs?format=raw{}",
        urlencode(id),
        if follow { "&follow=1" } else { "" }
    );
    let resp = client.get_stream(&path).await?;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| CliError::Failed(format!("log stream broke: {e}")))?;
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(())
}

/// `delegate-cp logs TASK [--follow]`: the log bytes as they are, in order.
pub async fn logs(
    client: &ApiClient,
    id: &str,
    follow: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    stream_logs(client, id, follow, out).await
}

/// `delegate-cp tasks [--json]`.
pub async fn tasks(client: &ApiClient, json: bool) -> Result<String, CliError> {
    let tasks: Vec<TaskView> = client.get_json("/api/v1/tasks").await?;
    if json {
        return Ok(to_json(&tasks));
    }
    let rows = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.op.clone(),
                t.workspace.clone(),
                t.pool.clone(),
                t.state.clone(),
                t.outcome.clone().unwrap_or_else(|| "-".into()),
                t.agent.clone().unwrap_or_else(|| "-".into()),
                t.created_at.clone(),
            ]
        })
        .collect();
    Ok(table(
        &[
            "ID",
            "OP",
            "WORKSPACE",
            "POOL",
            "STATE",
            "OUTCOME",
            "AGENT",
            "CREATED",
        ],
        rows,
    ))
}

/// `delegate-cp show TASK [--json]`.
pub async fn show(client: &ApiClient, id: &str, json: bool) -> Result<String, CliError> {
    let t: TaskView = client
        .get_json(&format!("/api/v1/tasks/{}", urlencode(id)))
        .await?;
    if json {
        return Ok(to_json(&t));
    }
    Ok(show_text(&t))
}

pub fn show_text(t: &TaskView) -> String {
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let mut rows = vec![
        vec!["id:".into(), t.id.clone()],
        vec!["op:".into(), t.op.clone()],
        vec!["workspace:".into(), t.workspace.clone()],
        vec!["pool:".into(), t.pool.clone()],
        vec!["state:".into(), t.state.clone()],
        vec!["outcome:".into(), dash(&t.outcome)],
        vec!["reason:".into(), dash(&t.reason)],
        vec!["agent:".into(), dash(&t.agent)],
        vec!["created:".into(), t.created_at.clone()],
        vec!["started:".into(), dash(&t.started_at)],
        vec!["finished:".into(), dash(&t.finished_at)],
        vec!["plan sha256:".into(), dash(&t.plan_sha256)],
    ];
    if let Some(s) = &t.summary {
        let mut line = format!(
            "{} to add, {} to change, {} to destroy",
            s.add, s.change, s.destroy
        );
        if let Some(d) = s.drift {
            line.push_str(&format!("; drift: {}", if d { "yes" } else { "no" }));
            if !s.drift_addresses.is_empty() {
                line.push_str(&format!(" ({})", s.drift_addresses.join(", ")));
            }
        }
        if s.applied {
            line.push_str("; applied");
        }
        rows.push(vec!["summary:".into(), line]);
        if let Some(outputs) = &s.outputs {
            rows.push(vec!["outputs:".into(), outputs.to_string()]);
        }
    }
    if !t.vars.is_empty() {
        rows.push(vec![
            "vars:".into(),
            t.vars.keys().cloned().collect::<Vec<_>>().join(", "),
        ]);
    }
    if !t.secrets.is_empty() {
        rows.push(vec!["secrets:".into(), t.secrets.join(", ")]);
    }
    if let Some(p) = &t.approved_from {
        rows.push(vec!["approved from:".into(), p.clone()]);
    }
    if let Some(a) = &t.approved_as {
        rows.push(vec!["approved as:".into(), a.clone()]);
    }
    if let Some(r) = &t.last_reject {
        rows.push(vec!["last reject:".into(), r.clone()]);
    }
    if let Some(at) = &t.lease_expired_at {
        rows.push(vec![
            "lease expired:".into(),
            format!("{at} (agent silent; waiting for it to come back)"),
        ]);
    }
    let mut out = String::new();
    let w = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
    for r in &rows {
        out.push_str(&format!("{:<w$}  {}\n", r[0], r[1]));
    }
    if let Some(events) = &t.events {
        if !events.is_empty() {
            out.push_str("events:\n");
            for e in events {
                out.push_str(&format!("  {}  {}\n", e.at, event_text(&e.event)));
            }
        }
    }
    if let Some(artifacts) = &t.artifacts {
        if !artifacts.is_empty() {
            out.push_str("artifacts:\n");
            for a in artifacts {
                out.push_str(&format!(
                    "  {}  {} bytes  sha256 {}\n",
                    a.kind, a.size, a.sha256
                ));
            }
        }
    }
    out
}

fn event_text(e: &serde_json::Value) -> String {
    let s = |k: &str| {
        e.get(k).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    match s("kind").as_deref() {
        Some("step_started") => format!("step {} started", s("step").unwrap_or_default()),
        Some("step_finished") => format!(
            "step {} finished: exit {} in {} ms",
            s("step").unwrap_or_default(),
            s("exit_code").unwrap_or_default(),
            s("duration_ms").unwrap_or_default()
        ),
        Some("notice") => format!(
            "{}: {}",
            s("level").unwrap_or_default(),
            s("text").unwrap_or_default()
        ),
        _ => e.to_string(),
    }
}

/// `delegate-cp cancel TASK`.
pub async fn cancel(client: &ApiClient, id: &str, json: bool) -> Result<String, CliError> {
    let t: TaskView = client
        .post_json(
            &format!("/api/v1/tasks/{}/cancel", urlencode(id)),
            &serde_json::json!({}),
        )
        .await?;
    if json {
        return Ok(to_json(&t));
    }
    Ok(if t.state == "finished" {
        format!("task {} cancelled\n", t.id)
    } else {
        format!("cancel requested for task {} (running on {}); its outcome follows when the agent stops it\n", t.id, t.agent.as_deref().unwrap_or("-"))
    })
}

/// `delegate-cp approve TASK [--json]`: prints the new apply task's id.
pub async fn approve(client: &ApiClient, id: &str, json: bool) -> Result<String, CliError> {
    let t: TaskView = client
        .post_json(
            &format!("/api/v1/tasks/{}/approve", urlencode(id)),
            &serde_json::json!({}),
        )
        .await?;
    Ok(if json {
        format!("{}\n", serde_json::json!({ "id": t.id }))
    } else {
        format!("{}\n", t.id)
    })
}

/// `delegate-cp state WORKSPACE [--version N] [--json]`.
pub async fn state(
    client: &ApiClient,
    ws: &str,
    version: Option<u64>,
    json: bool,
) -> Result<String, CliError> {
    if let Some(n) = version {
        let bytes = client
            .get_bytes(&format!(
                "/api/v1/workspaces/{}/state/versions/{n}",
                urlencode(ws)
            ))
            .await?;
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        return Ok(text);
    }
    let versions: Vec<StateVersionView> = client
        .get_json(&format!(
            "/api/v1/workspaces/{}/state/versions",
            urlencode(ws)
        ))
        .await?;
    if json {
        return Ok(to_json(&versions));
    }
    let rows = versions
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                v.serial
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                v.size.to_string(),
                v.sha256.clone(),
                v.task_id.clone().unwrap_or_else(|| "(pushed)".into()),
                v.created_at.clone(),
            ]
        })
        .collect();
    Ok(table(
        &["VERSION", "SERIAL", "SIZE", "SHA256", "TASK", "CREATED"],
        rows,
    ))
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

/// `delegate-cp audit --verify`: check the hash chain; fails if it is broken.
pub async fn audit_verify(client: &ApiClient, json: bool) -> Result<String, CliError> {
    let v: crate::api::AuditVerifyView = client.get_json("/api/v1/audit/verify").await?;
    if json {
        return Ok(to_json(&v));
    }
    match v.first_bad {
        None => Ok(format!("audit trail intact: {} records\n", v.records)),
        Some(id) => Err(CliError::Failed(format!(
            "audit trail broken: record {id} does not match its hash chain ({} records)",
            v.records
        ))),
    }
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
    fn submit_request_from_args() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hello");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("main.tf"), "").unwrap();
        let args = SubmitArgs {
            dir: dir.clone(),
            op: "plan".into(),
            vars: vec!["greeting=hi=there".into()],
            env: vec!["TF_LOG=ERROR".into()],
            secrets: vec!["API_TOKEN=abc".into()],
            secret_env: vec!["FROM_ENV".into()],
            ..Default::default()
        };
        let req = build_submit(&args, |n| (n == "FROM_ENV").then(|| "envval".to_string())).unwrap();
        assert_eq!(req.workspace, "hello", "defaults to the directory name");
        assert_eq!(req.vars["greeting"], "hi=there");
        assert_eq!(req.env["TF_LOG"], "ERROR");
        assert_eq!(req.secrets.0["API_TOKEN"], "abc");
        assert_eq!(req.secrets.0["FROM_ENV"], "envval");
        let missing = build_submit(&args, |_| None).unwrap_err().to_string();
        assert!(missing.contains("FROM_ENV"), "{missing}");
        let bad = SubmitArgs {
            secrets: vec!["novalue-s3cr3t".into()],
            ..args
        };
        let err = build_submit(&bad, |_| Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn urlencode_query() {
        assert_eq!(urlencode("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(urlencode("6f1c-2f5e"), "6f1c-2f5e");
    }
}
