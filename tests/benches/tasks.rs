//! `cargo bench -p delegate-tests --bench tasks [-- SECTION...]`
//!
//! Task figures (issue 3), each next to a baseline measured in the same run on the same machine,
//! never as a threshold:
//! - `plan`: a full plan task of `examples/hello` through the real control plane + agent (submit
//!   until the task is finished) vs the same steps (`init`, `plan -out`, `show -json`) as bare
//!   `docker run`s of the same sandbox image, workspace bind-mounted, local state;
//! - `dispatch`: submit → first container create of the task (from `docker events`), p50/p99;
//! - `loglat`: log line latency sandbox → control plane → user API follower, p50/p99, with a
//!   static line printer (`tests/bench-fixtures/ticker.c`) as the sandbox image, vs the same
//!   printer in a bare `docker run` whose stdout is read directly (Docker attach latency).
//!
//! Sections are selected by name on the command line; no name runs them all. Every container the
//! bench creates carries the run label and is removed; the printer's image is tagged with the run
//! id and removed at the end.

use delegate_tests::docker::sandbox_image;
use delegate_tests::fleet::Fleet;
use delegate_tests::process::{bin, table};
use delegate_tests::{ControlPlane, RUN_LABEL};
use futures_util::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncBufReadExt;

/// Plan tasks per path (after one warm-up each).
const PLAN_RUNS: usize = 5;
/// Small tasks for the dispatch figure.
const DISPATCH_TASKS: usize = 20;
/// Tasks through the agent for the log latency figure (two step containers each).
const LOGLAT_TASKS: usize = 2;
/// Lines the printer writes per container, and the gap between them.
const TICKER_LINES: usize = 300;
const TICKER_INTERVAL_US: u64 = 5000;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let timed = |name: &str, t: Instant| eprintln!("[{name}: section took {:.0?}]", t.elapsed());
    // Build the binaries and the sandbox image before any section is timed.
    let t = Instant::now();
    bin("delegate");
    sandbox_image();
    timed("setup: binaries and sandbox image", t);
    if want("plan") {
        let t = Instant::now();
        rt.block_on(plan());
        timed("plan", t);
    }
    if want("dispatch") || want("loglat") {
        let ticker = TickerImage::build();
        if want("dispatch") {
            let t = Instant::now();
            rt.block_on(dispatch(&ticker));
            timed("dispatch", t);
        }
        if want("loglat") {
            let t = Instant::now();
            rt.block_on(loglat(&ticker));
            timed("loglat", t);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// The `p` quantile (nearest rank) of `v`, sorted in place.
fn quantile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn median(v: &mut [f64]) -> f64 {
    quantile(v, 0.5)
}

/// The hardening flags of a step container (see `agent/src/sandbox/docker.rs` `step_config`),
/// for the bare `docker run` baselines.
fn hardened_run(run: &str, image: &str, entrypoint: &str) -> Vec<String> {
    [
        "run",
        "--rm",
        "--label",
        &format!("{RUN_LABEL}={run}"),
        "--user",
        "65534:65534",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,noexec,nosuid,size=256m",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        "--init",
        "--ipc",
        "private",
        "--memory",
        "2g",
        "--memory-swap",
        "2g",
        "--cpus",
        "1",
        "--pids-limit",
        "512",
        "--network",
        "none",
        "--log-driver",
        "none",
        "-e",
        "TF_IN_AUTOMATION=1",
        "-e",
        "TF_INPUT=0",
        "-e",
        "HOME=/tmp",
        "-e",
        "CHECKPOINT_DISABLE=1",
        "--entrypoint",
        entrypoint,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(std::iter::once(image.to_string()))
    .collect()
}

/// The binary an image's steps run (its `io.delegate.binary` label).
fn image_binary(image: &str) -> String {
    let out = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"io.delegate.binary\"}}",
            image,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "docker image inspect {image} failed");
    let b = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if b.is_empty() || b == "<no value>" {
        "tofu".into()
    } else {
        b
    }
}

/// A user API client that streams (the helpers' `Api` reads whole bodies).
struct Follower {
    base: String,
    token: String,
    client: reqwest::Client,
}

impl Follower {
    fn new(cp: &ControlPlane) -> Follower {
        let ca = std::fs::read(cp.path().join("tls/ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .unwrap();
        let token = std::fs::read_to_string(cp.path().join("api-token"))
            .unwrap()
            .trim()
            .to_string();
        Follower {
            base: format!("https://127.0.0.1:{}", cp.api_port),
            token,
            client,
        }
    }

    /// Follow the task's raw log until the control plane ends the stream (the task finished);
    /// `on_line` gets the arrival time (ns since the epoch) of each complete line.
    async fn follow(&self, id: &str, mut on_line: impl FnMut(i128, &str)) {
        let resp = self
            .client
            .get(format!(
                "{}/api/v1/tasks/{id}/logs?follow=1&format=raw",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "following the logs of {id}");
        let mut body = resp.bytes_stream();
        let mut partial: Vec<u8> = Vec::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            let at = now_ns();
            partial.extend_from_slice(&chunk);
            while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = partial.drain(..=pos).collect();
                on_line(at, String::from_utf8_lossy(&line[..pos]).as_ref());
            }
        }
    }

    async fn task(&self, id: &str) -> Value {
        let resp = self
            .client
            .get(format!("{}/api/v1/tasks/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        resp.json().await.unwrap()
    }

    /// Wait until the task is finished (the end of its log follow, then a poll as a fallback)
    /// and insist it succeeded.
    async fn succeeded(&self, id: &str, f: &Fleet) {
        self.follow(id, |_, _| {}).await;
        self.finished_ok(id, f).await;
    }

    /// Poll until the task is finished and insist it succeeded.
    async fn finished_ok(&self, id: &str, f: &Fleet) {
        let deadline = Instant::now() + delegate_tests::fleet::TASK_WAIT;
        loop {
            let v = self.task(id).await;
            if v["state"] == "finished" {
                assert_eq!(
                    v["outcome"],
                    "succeeded",
                    "task {id}: {v:#}\nlogs:\n{}",
                    f.logs(id)
                );
                return;
            }
            assert!(Instant::now() < deadline, "task {id} never finished: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// plan: control plane + agent vs bare docker run

/// `init`, `plan -out`, `show -json` as bare `docker run`s over a fresh bind-mounted copy of the
/// workspace, like the agent's steps (same image, entrypoint, hardening, environment) but with
/// local state and no control plane, volume upload, network or backend relay.
async fn bare_plan(run: &str, image: &str, binary: &str, src: &Path) -> Duration {
    let dir = tempfile::Builder::new()
        .prefix("delegate-bench-ws-")
        .tempdir()
        .unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    // The sandbox user writes .terraform/, the lock file, the plan and the local state.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mount = format!("{}:/workspace", dir.path().display());
    let steps: [&[&str]; 3] = [
        &["init", "-input=false", "-no-color"],
        &[
            "plan",
            "-input=false",
            "-no-color",
            "-out=/workspace/plan.tfplan",
        ],
        &["show", "-json", "-no-color", "/workspace/plan.tfplan"],
    ];
    let t = Instant::now();
    for args in steps {
        let mut cmd = tokio::process::Command::new("docker");
        let mut all = hardened_run(run, image, binary);
        let image_arg = all.pop().unwrap();
        all.extend([
            "-v".into(),
            mount.clone(),
            "-w".into(),
            "/workspace".into(),
            image_arg,
        ]);
        cmd.args(&all)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = cmd.output().await.unwrap();
        assert!(
            out.status.success(),
            "bare docker run {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if args[0] == "show" {
            let v: Value = serde_json::from_slice(&out.stdout).expect("show -json prints JSON");
            assert_eq!(
                v["resource_changes"].as_array().map(Vec::len),
                Some(3),
                "the bare plan saw 3 resources"
            );
        }
    }
    t.elapsed()
}

async fn agent_plan(f: &Fleet, follower: &Follower, ws: &Path) -> Duration {
    let t = Instant::now();
    let id = f.submit(ws, &["--op", "plan"]);
    follower.succeeded(&id, f).await;
    t.elapsed()
}

async fn plan() {
    let f = Fleet::start(&["bench"], 1).await;
    let image = sandbox_image();
    let binary = image_binary(image);
    let follower = Follower::new(&f.cp);
    let ws = f.workspace("hello");
    // Warm-up: page cache, image layers, the agent's first task.
    agent_plan(&f, &follower, &ws).await;
    bare_plan(&f.run, image, &binary, &ws).await;
    let mut ours = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..PLAN_RUNS {
        ours.push(agent_plan(&f, &follower, &ws).await.as_secs_f64());
        bare.push(bare_plan(&f.run, image, &binary, &ws).await.as_secs_f64());
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "plan: control plane + agent, submit -> finished: median {:.2} s (runs: {} s)",
        median(&mut ours.clone()),
        fmt(&ours)
    );
    println!(
        "plan: bare docker run init + plan -out + show -json ({binary}, same image and hardening, bind mount, local state): median {:.2} s (runs: {} s)",
        median(&mut bare.clone()),
        fmt(&bare)
    );
    println!(
        "plan: ratio {:.2}x of baseline (n={PLAN_RUNS} each, interleaved, after one warm-up each)",
        median(&mut ours) / median(&mut bare)
    );
    drop(f);
}

// ---------------------------------------------------------------------------------------------
// The printer image

/// The ticker built with `cc -static` and packed by `delegate sandbox build-image`, tagged with
/// the run id; removed on drop.
struct TickerImage {
    tag: String,
    binary: String,
    _dir: tempfile::TempDir,
}

impl TickerImage {
    fn build() -> TickerImage {
        let dir = tempfile::Builder::new()
            .prefix("delegate-bench-ticker-")
            .tempdir()
            .unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-fixtures/ticker.c");
        let exe: PathBuf = dir.path().join("ticker");
        let out = Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(&exe)
            .arg(&src)
            .output()
            .expect("run cc");
        assert!(
            out.status.success(),
            "cc -static ticker.c failed (a static libc is needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tag = format!("delegate-bench-ticker:{}", delegate_tests::run_id());
        // The image builder asks `ticker version`, which answers like OpenTofu.
        let out = Command::new(bin("delegate"))
            .args(["sandbox", "build-image", "--from-binary"])
            .arg(&exe)
            .args(["--tag", &tag])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "delegate sandbox build-image (ticker) failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let binary = image_binary(&tag);
        TickerImage {
            tag,
            binary,
            _dir: dir,
        }
    }

    fn fleet_config(&self) -> impl Fn(&mut toml::Table) + '_ {
        move |doc: &mut toml::Table| {
            table(doc, "sandbox").insert("image".into(), toml::Value::String(self.tag.clone()));
        }
    }
}

impl Drop for TickerImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["image", "rm", "-f", &self.tag])
            .output();
    }
}

// ---------------------------------------------------------------------------------------------
// dispatch: submit -> first container create

/// `docker events` for this run's container creates, streamed from before the first submit:
/// the daemon keeps only its last 256 events, so a query after the fact loses early tasks.
struct CreateEvents {
    child: tokio::process::Child,
    /// First `create` time (ns since the epoch) of a container, per task id.
    first: Arc<std::sync::Mutex<HashMap<String, i128>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl CreateEvents {
    async fn start(run: &str) -> CreateEvents {
        let since = now_ns() - 1_000_000_000;
        let since = format!("{}.{:09}", since / 1_000_000_000, since % 1_000_000_000);
        let mut child = tokio::process::Command::new("docker")
            .args([
                "events",
                "--since",
                &since,
                "--filter",
                &format!("label={RUN_LABEL}={run}"),
                "--filter",
                "type=container",
                "--filter",
                "event=create",
                "--format",
                "{{.TimeNano}} {{index .Actor.Attributes \"io.delegate.task\"}}",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run docker events");
        let stdout = child.stdout.take().expect("piped stdout");
        let first: Arc<std::sync::Mutex<HashMap<String, i128>>> = Arc::default();
        let map = first.clone();
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut it = line.split_whitespace();
                let (Some(t), Some(task)) = (it.next(), it.next()) else {
                    continue;
                };
                let Ok(t) = t.parse::<i128>() else { continue };
                let mut m = map.lock().unwrap();
                let e = m.entry(task.to_string()).or_insert(t);
                *e = (*e).min(t);
            }
        });
        CreateEvents {
            child,
            first,
            reader,
        }
    }

    /// The first create time of `task`'s containers, waiting a little for the event to arrive.
    async fn first_create(&self, task: &str) -> i128 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(t) = self.first.lock().unwrap().get(task) {
                return *t;
            }
            assert!(
                Instant::now() < deadline,
                "no container create event for task {task}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        self.reader.abort();
    }
}

async fn dispatch(ticker: &TickerImage) {
    // Two slots: the previous task may still be cleaning up when the next one is submitted.
    let f = Fleet::start_with(&["bench"], 2, ticker.fleet_config()).await;
    let follower = Follower::new(&f.cp);
    let ws = f.workspace("hello");
    let events = CreateEvents::start(&f.run).await;
    let mut submits = Vec::new();
    // One warm-up task, not counted.
    for i in 0..=DISPATCH_TASKS {
        let t0 = now_ns();
        let id = f.submit(&ws, &["--op", "validate", "--env", "TICKER_LINES=1"]);
        let t1 = now_ns();
        follower.succeeded(&id, &f).await;
        if i > 0 {
            submits.push((id, t0, t1));
        }
    }
    let mut from_start = Vec::new();
    let mut from_queued = Vec::new();
    for (id, t0, t1) in &submits {
        let c = events.first_create(id).await;
        from_start.push((c - t0) as f64 / 1e6);
        from_queued.push((c - t1) as f64 / 1e6);
    }
    events.stop().await;
    let n = submits.len();
    println!(
        "dispatch: submit returned (task queued) -> first container create: p50 {:.1} ms p99 {:.1} ms (n={n}, one agent with a free slot)",
        quantile(&mut from_queued, 0.5),
        quantile(&mut from_queued, 0.99)
    );
    println!(
        "dispatch: `delegate-cp submit` started (pack + upload included) -> first container create: p50 {:.1} ms p99 {:.1} ms",
        quantile(&mut from_start, 0.5),
        quantile(&mut from_start, 0.99)
    );
    drop(f);
}

// ---------------------------------------------------------------------------------------------
// loglat: printer line timestamp -> arrival at the user API follower

/// `<ns> <i>` as printed by the ticker.
fn ticker_stamp(line: &str) -> Option<i128> {
    let mut it = line.split(' ');
    let ns = it.next()?.parse::<i128>().ok()?;
    it.next()?.parse::<u64>().ok()?;
    it.next().is_none().then_some(ns)
}

fn ticker_env() -> [(String, String); 2] {
    [
        ("TICKER_LINES".into(), TICKER_LINES.to_string()),
        ("TICKER_INTERVAL_US".into(), TICKER_INTERVAL_US.to_string()),
    ]
}

/// The printer in a bare `docker run`, its stdout read directly; latencies in ms.
async fn bare_ticker(run: &str, ticker: &TickerImage) -> Vec<f64> {
    let mut all = hardened_run(run, &ticker.tag, &ticker.binary);
    let image = all.pop().unwrap();
    for (k, v) in ticker_env() {
        all.push("-e".into());
        all.push(format!("{k}={v}"));
    }
    all.push(image);
    all.push("validate".into());
    let mut child = tokio::process::Command::new("docker")
        .args(&all)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut lat = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        let at = now_ns();
        if let Some(ns) = ticker_stamp(&line) {
            lat.push((at - ns) as f64 / 1e6);
        }
    }
    let status = child.wait().await.unwrap();
    assert!(status.success(), "bare ticker run failed: {status}");
    assert_eq!(lat.len(), TICKER_LINES, "bare ticker lines");
    lat
}

/// One validate task (init + validate, each the printer) through the agent, followed through
/// the user API; latencies in ms.
async fn agent_ticker(f: &Fleet, follower: &Follower, ws: &Path) -> Vec<f64> {
    let env: Vec<String> = ticker_env()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut args = vec!["--op", "validate"];
    for e in &env {
        args.push("--env");
        args.push(e);
    }
    let id = f.submit(ws, &args);
    let mut lat = Vec::new();
    follower
        .follow(&id, |at, line| {
            if let Some(ns) = ticker_stamp(line) {
                lat.push((at - ns) as f64 / 1e6);
            }
        })
        .await;
    follower.finished_ok(&id, f).await;
    assert_eq!(lat.len(), 2 * TICKER_LINES, "lines of task {id}");
    lat
}

async fn loglat(ticker: &TickerImage) {
    let f = Fleet::start_with(&["bench"], 1, ticker.fleet_config()).await;
    let follower = Follower::new(&f.cp);
    let ws = f.workspace("hello");
    let mut ours = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..LOGLAT_TASKS {
        ours.extend(agent_ticker(&f, &follower, &ws).await);
        // Two containers, as the task had two steps.
        bare.extend(bare_ticker(&f.run, ticker).await);
        bare.extend(bare_ticker(&f.run, ticker).await);
    }
    let (o50, o99) = (quantile(&mut ours, 0.5), quantile(&mut ours, 0.99));
    let (b50, b99) = (quantile(&mut bare, 0.5), quantile(&mut bare, 0.99));
    println!(
        "loglat: bare docker run, stdout read directly (docker attach): p50 {b50:.2} ms p99 {b99:.2} ms (n={} lines)",
        bare.len()
    );
    println!(
        "loglat: sandbox -> agent -> control plane -> user API follow (raw): p50 {o50:.2} ms p99 {o99:.2} ms (n={} lines, {LOGLAT_TASKS} validate tasks, a line every {} ms)",
        ours.len(),
        TICKER_INTERVAL_US as f64 / 1000.0
    );
    println!(
        "loglat: p50 ratio {:.1}x, p99 ratio {:.1}x of baseline",
        o50 / b50,
        o99 / b99
    );
    drop(f);
}
