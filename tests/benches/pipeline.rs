//! `cargo bench -p delegate-tests --bench pipeline [-- SECTION...]`
//!
//! At-rest and log pipeline figures (issue 4), each next to a baseline measured in the same run on
//! the same machine, never as a threshold:
//! - `seal`: `delegate_crypto::seal`/`open` (streaming AES-256-GCM format, 64 KiB chunks) vs
//!   ring's raw AES-256-GCM (`LessSafeKey` in place) over the same 64 KiB chunks, MB/s; and the
//!   same per spool-record-sized message (a header, HKDF and salt per sealed stream);
//! - `logs`: the agent's log pipeline — redact (`redact::StreamRedactor`, 5 secrets), cut into
//!   lines (`sandbox::logs::LineSplitter`), one Log frame per line (`encode_log`), appended to the
//!   sealed spool (`spool::TaskSpool`, one record per frame, compacted on acks) and the outbox,
//!   then sent over a TLS 1.3 WebSocket on loopback — vs the raw link: the same kind of
//!   connection carrying the same lines as pre-encoded Log frames, without redact/spool. Run
//!   twice: one frame per line (the worst case, a driver that keeps up line by line), and with the
//!   lines of each read merged as the task driver merges output queued together
//!   (`tasks::COALESCE_BYTES`; the case when the link or spool is the slower side).
//!
//! Sections are selected by name on the command line; no name runs them all.

use base64::Engine;
use delegate_agent::redact::{Redactor, REPLACEMENT};
use delegate_agent::sandbox::logs::LineSplitter;
use delegate_agent::spool::record::RecordBody;
use delegate_agent::spool::{Spool, SpoolSettings};
use delegate_agent::tasks::{Outbox, WireFrame, COALESCE_BYTES};
use delegate_crypto::KeyRing;
use delegate_protocol::binary::encode_log;
use delegate_protocol::{decode_binary, BinaryFrame, LogStream};
use delegate_tests::certs;
use futures_util::{SinkExt, StreamExt};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::SecureRandom;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};
use uuid::Uuid;

/// Plaintext per seal/open round, and rounds (interleaved between the two implementations).
const SEAL_BYTES: usize = 32 << 20;
const SEAL_ROUNDS: usize = 5;
const CHUNK: usize = delegate_crypto::DEFAULT_CHUNK_SIZE;
/// Spool-record-sized messages: a ~100-byte log line plus the frame and record headers.
const RECORD_BYTES: usize = 160;
const RECORDS: usize = 50_000;
/// Log text per pipeline round, the size of the reads it arrives in (as from Docker attach),
/// and rounds (raw and pipeline alternate).
const LOG_BYTES: usize = 16 << 20;
const READ_CHUNK: usize = 16 * 1024;
const LOG_ROUNDS: usize = 3;
/// The receiver acknowledges every this many frames, as the control plane does in batches.
const ACK_EVERY: u64 = 256;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    let timed = |name: &str, t: Instant| eprintln!("[{name}: section took {:.0?}]", t.elapsed());
    if want("seal") {
        let t = Instant::now();
        seal();
        timed("seal", t);
    }
    if want("logs") {
        let t = Instant::now();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(logs());
        timed("logs", t);
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    ring::rand::SystemRandom::new().fill(&mut v).unwrap();
    v
}

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut k).unwrap();
    k
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// seal: delegate-crypto vs ring raw AES-256-GCM

/// A STREAM-style nonce like delegate-crypto's: prefix, counter, last-chunk flag.
fn nonce(i: usize, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(b"benchnp");
    n[7..11].copy_from_slice(&(i as u32).to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Raw AES-256-GCM over 64 KiB chunks, each chunk copied to the output and sealed in place, tag
/// appended; the AAD has the size of a sealed stream's header, as delegate-crypto authenticates.
fn ring_seal(key: &LessSafeKey, aad: &[u8], data: &[u8]) -> Vec<u8> {
    let n = data.len().div_ceil(CHUNK);
    let mut out = Vec::with_capacity(data.len() + n * 16);
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        let start = out.len();
        out.extend_from_slice(chunk);
        let tag = key
            .seal_in_place_separate_tag(nonce(i, i + 1 == n), Aad::from(aad), &mut out[start..])
            .unwrap();
        out.extend_from_slice(tag.as_ref());
    }
    out
}

fn ring_open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Vec<u8> {
    let n = sealed.len().div_ceil(CHUNK + 16);
    let mut out = Vec::with_capacity(sealed.len());
    for (i, chunk) in sealed.chunks(CHUNK + 16).enumerate() {
        let start = out.len();
        out.extend_from_slice(chunk);
        let plain = key
            .open_in_place(nonce(i, i + 1 == n), Aad::from(aad), &mut out[start..])
            .expect("ring open")
            .len();
        out.truncate(start + plain);
    }
    out
}

fn seal() {
    let data = random_bytes(SEAL_BYTES);
    let key = random_key();
    let keyring = KeyRing::from_key("bench", &key).unwrap();
    let raw = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
    // A sealed stream's header is 65 + key id bytes; its first 49 + id are the AAD.
    let aad = vec![0x5au8; 49 + "bench".len()];

    let (mut rs, mut ro, mut ds, mut dopen) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..SEAL_ROUNDS {
        let t = Instant::now();
        let sealed_raw = black_box(ring_seal(&raw, &aad, black_box(&data)));
        rs.push(mbps(SEAL_BYTES, t.elapsed()));

        let t = Instant::now();
        let sealed = black_box(delegate_crypto::seal(&keyring, black_box(&data)).unwrap());
        ds.push(mbps(SEAL_BYTES, t.elapsed()));

        let t = Instant::now();
        let opened_raw = black_box(ring_open(&raw, &aad, black_box(&sealed_raw)));
        ro.push(mbps(SEAL_BYTES, t.elapsed()));

        let t = Instant::now();
        let opened = black_box(delegate_crypto::open(&keyring, black_box(&sealed)).unwrap());
        dopen.push(mbps(SEAL_BYTES, t.elapsed()));

        if round == 0 {
            assert!(opened_raw == data && opened == data, "round trip");
            assert_eq!(
                sealed.len() as u64,
                delegate_crypto::sealed_len("bench", SEAL_BYTES as u64)
            );
        }
    }
    let (rs, ds, ro, dopen) = (
        median(&mut rs),
        median(&mut ds),
        median(&mut ro),
        median(&mut dopen),
    );
    println!(
        "seal: 64 KiB chunks, {} MiB x {SEAL_ROUNDS} rounds (median round):",
        SEAL_BYTES >> 20
    );
    println!(
        "seal:   seal  delegate-crypto {ds:.0} MB/s; ring raw AES-256-GCM {rs:.0} MB/s; ratio {:.2} of baseline",
        ds / rs
    );
    println!(
        "seal:   open  delegate-crypto {dopen:.0} MB/s; ring raw AES-256-GCM {ro:.0} MB/s; ratio {:.2} of baseline",
        dopen / ro
    );

    // One sealed stream per small message, as the spool seals one record per frame.
    let msgs: Vec<Vec<u8>> = (0..RECORDS).map(|_| random_bytes(RECORD_BYTES)).collect();
    let t = Instant::now();
    let mut sealed_msgs = Vec::with_capacity(RECORDS);
    for (i, m) in msgs.iter().enumerate() {
        let mut buf = m.clone();
        let tag = raw
            .seal_in_place_separate_tag(nonce(i, true), Aad::from(&aad[..]), &mut buf)
            .unwrap();
        buf.extend_from_slice(tag.as_ref());
        sealed_msgs.push(black_box(buf));
    }
    let raw_small = t.elapsed();
    let t = Instant::now();
    let mut ours = Vec::with_capacity(RECORDS);
    for m in &msgs {
        ours.push(black_box(delegate_crypto::seal(&keyring, m).unwrap()));
    }
    let ours_small = t.elapsed();
    let t = Instant::now();
    for s in &ours {
        black_box(delegate_crypto::open(&keyring, s).unwrap());
    }
    let ours_small_open = t.elapsed();
    let rate = |d: Duration| RECORDS as f64 / d.as_secs_f64() / 1000.0;
    println!(
        "seal:   {RECORD_BYTES}-byte messages, one sealed stream each (salt, HKDF, header tag): seal {:.0}k/s ({:.1} MB/s), open {:.0}k/s; ring raw seal {:.0}k/s ({:.1} MB/s); seal ratio {:.3} of baseline",
        rate(ours_small),
        mbps(RECORDS * RECORD_BYTES, ours_small),
        rate(ours_small_open),
        rate(raw_small),
        mbps(RECORDS * RECORD_BYTES, raw_small),
        raw_small.as_secs_f64() / ours_small.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// logs: redact + spool + send vs the raw link

struct LogInput {
    /// The log text in the reads it arrives in.
    chunks: Vec<Vec<u8>>,
    bytes: usize,
    secrets: Vec<String>,
    /// Occurrences of a secret (raw or base64) placed in the text.
    planted: usize,
}

/// A small deterministic generator (xorshift64*), so every round sees the same text.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn alnum(&mut self, n: usize) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        (0..n)
            .map(|_| A[(self.next() % A.len() as u64) as usize] as char)
            .collect()
    }
}

/// tofu-like plan output with the 5 secrets in it now and then (raw, and base64 in a header).
fn log_input() -> LogInput {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let secrets: Vec<String> = (0..5).map(|_| rng.alnum(24)).collect();
    let mut text = Vec::with_capacity(LOG_BYTES + 256);
    let mut planted = 0;
    let mut i: u64 = 0;
    while text.len() < LOG_BYTES {
        i += 1;
        let line = match i % 7 {
            _ if i.is_multiple_of(97) => {
                planted += 1;
                format!(
                    "      + token    = \"{}\"\n",
                    secrets[(i / 97) as usize % 5]
                )
            }
            _ if i.is_multiple_of(389) => {
                planted += 1;
                let s = &secrets[(i / 389) as usize % 5];
                format!(
                    "2025-01-01T00:00:00.000Z [DEBUG] provider: Authorization: Basic {}\n",
                    base64::engine::general_purpose::STANDARD.encode(format!("user:{s}"))
                )
            }
            0 => format!("  # terraform_data.item[{i}] will be created\n"),
            1 => format!("  + resource \"terraform_data\" \"item\" {{ # {i}\n"),
            2 => format!("      + id     = (known after apply) # {}\n", rng.alnum(12)),
            3 => format!("      + input  = \"{}\"\n", rng.alnum(40)),
            4 => "      + output = (known after apply)\n".to_string(),
            5 => format!(
                "terraform_data.item[{i}]: Refreshing state... [id={:016x}{:016x}]\n",
                rng.next(),
                rng.next()
            ),
            _ => "    }\n".to_string(),
        };
        text.extend_from_slice(line.as_bytes());
    }
    let bytes = text.len();
    let chunks = text.chunks(READ_CHUNK).map(<[u8]>::to_vec).collect();
    LogInput {
        chunks,
        bytes,
        secrets,
        planted,
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// The receiving end: decodes every Log frame, keeps its bytes, acknowledges every
/// `ACK_EVERY` frames; on "fin" answers "fin FRAMES" and hands over what it got.
async fn receiver(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    got: mpsc::UnboundedSender<Vec<u8>>,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        let Ok(tls) = acceptor.accept(tcp).await else {
            continue;
        };
        let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
            continue;
        };
        let mut data = Vec::with_capacity(LOG_BYTES + LOG_BYTES / 8);
        let mut frames: u64 = 0;
        let mut last_seq = 0;
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                WsMessage::Binary(b) => {
                    let Ok(BinaryFrame::Log(log)) = decode_binary(&b) else {
                        panic!("receiver: not a log frame");
                    };
                    assert_eq!(log.seq, last_seq + 1, "receiver: frames in order");
                    last_seq = log.seq;
                    data.extend_from_slice(&log.data);
                    frames += 1;
                    if frames.is_multiple_of(ACK_EVERY) {
                        ws.send(WsMessage::text(format!("ack {last_seq}")))
                            .await
                            .unwrap();
                    }
                }
                WsMessage::Text(t) if t.as_str() == "fin" => {
                    ws.send(WsMessage::text(format!("fin {frames}")))
                        .await
                        .unwrap();
                    let _ = got.send(std::mem::take(&mut data));
                }
                _ => {}
            }
        }
    }
}

/// Sends what the producer hands over, one WebSocket message per frame (`send` flushes each,
/// as the agent's link writer does); acks go back to the producer. Returns when the receiver
/// confirmed the end, with the frame count it saw.
async fn send_all(
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    mut frames: mpsc::Receiver<Bytes>,
    acks: std::sync::mpsc::Sender<u64>,
) -> u64 {
    let ws = certs::try_connect(addr, client).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if let WsMessage::Text(t) = msg {
                let t = t.as_str();
                if let Some(n) = t.strip_prefix("fin ") {
                    return n.parse::<u64>().unwrap();
                }
                if let Some(seq) = t.strip_prefix("ack ").and_then(|s| s.parse().ok()) {
                    let _ = acks.send(seq);
                }
            }
        }
        panic!("the receiver closed before confirming the end");
    });
    while let Some(b) = frames.recv().await {
        sink.send(WsMessage::Binary(b)).await.unwrap();
    }
    sink.send(WsMessage::text("fin")).await.unwrap();
    let n = reader.await.unwrap();
    let _ = sink.close().await;
    n
}

/// What the agent does per stream: redact, cut lines, one Log frame per line appended to the
/// sealed spool and the outbox, handed to the link; acks compact spool and outbox.
fn pipeline_producer(
    input: &LogInput,
    spool_dir: &std::path::Path,
    tx: mpsc::Sender<Bytes>,
    acks: std::sync::mpsc::Receiver<u64>,
    merge: bool,
) -> u64 {
    let keyring = KeyRing::from_key("bench", &random_key()).unwrap();
    let (spool, _) = Spool::open(SpoolSettings::new(spool_dir.to_path_buf()), keyring).unwrap();
    let task = Uuid::new_v4();
    let mut ts = spool.task(task);
    let mut outbox = Outbox::new();
    let secrets: Vec<&str> = input.secrets.iter().map(String::as_str).collect();
    let mut redactor = Redactor::new(&secrets).unwrap().stream();
    let mut lines = LineSplitter::default();
    let mut emit = |line: &[u8]| {
        while let Ok(seq) = acks.try_recv() {
            ts.ack(seq, false).unwrap();
            outbox.ack(seq).unwrap();
        }
        let seq = outbox.last_seq() + 1;
        let frame = Bytes::from(encode_log(&task, seq, LogStream::Stdout, line));
        ts.append(
            &[RecordBody::Frame {
                seq,
                frame: WireFrame::Binary(frame.clone()),
                done: false,
            }],
            false,
        )
        .unwrap();
        outbox.push(|_| WireFrame::Binary(frame));
        while let Some(WireFrame::Binary(b)) = outbox.next_unsent() {
            tx.blocking_send(b).unwrap();
        }
    };
    for chunk in &input.chunks {
        let safe = redactor.push(chunk);
        let produced = lines.push(&safe);
        if merge {
            // What the task driver does with output queued together (`tasks::COALESCE_BYTES`):
            // the lines of one read become one frame, up to the bound.
            let mut buf: Vec<u8> = Vec::new();
            for line in produced {
                if !buf.is_empty() && buf.len() + line.len() > COALESCE_BYTES {
                    emit(&buf);
                    buf.clear();
                }
                buf.extend_from_slice(&line);
            }
            if !buf.is_empty() {
                emit(&buf);
            }
        } else {
            for line in produced {
                emit(&line);
            }
        }
    }
    let rest = redactor.finish();
    for line in lines.push(&rest) {
        emit(&line);
    }
    if let Some(p) = lines.take_partial() {
        emit(&p);
    }
    let frames = outbox.last_seq();
    drop(ts);
    drop(spool);
    frames
}

/// The same lines, unredacted, as pre-encoded Log frames.
fn raw_frames(input: &LogInput) -> Vec<Bytes> {
    let task = Uuid::new_v4();
    let mut lines = LineSplitter::default();
    let mut out = Vec::new();
    for chunk in &input.chunks {
        for line in lines.push(chunk) {
            let seq = out.len() as u64 + 1;
            out.push(Bytes::from(encode_log(
                &task,
                seq,
                LogStream::Stdout,
                &line,
            )));
        }
    }
    if let Some(p) = lines.take_partial() {
        let seq = out.len() as u64 + 1;
        out.push(Bytes::from(encode_log(&task, seq, LogStream::Stdout, &p)));
    }
    out
}

struct Link {
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    got: mpsc::UnboundedReceiver<Vec<u8>>,
    server: tokio::task::JoinHandle<()>,
}

async fn link() -> Link {
    let ca = certs::new_ca("delegate bench CA");
    let server_id = certs::server_cert(&ca);
    let server_cfg = certs::server_config(&server_id, &[&rustls::version::TLS13]);
    let client = certs::client_config(&ca.0.pem(), None, &[&rustls::version::TLS13]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, got) = mpsc::unbounded_channel();
    let server = tokio::spawn(receiver(
        listener,
        tokio_rustls::TlsAcceptor::from(server_cfg),
        tx,
    ));
    Link {
        addr,
        client,
        got,
        server,
    }
}

/// One round over the raw link; returns the elapsed time and what the receiver got.
async fn raw_round(l: &mut Link, frames: &[Bytes]) -> (Duration, Vec<u8>) {
    let (tx, rx) = mpsc::channel(1024);
    let (ack_tx, _ack_rx) = std::sync::mpsc::channel();
    let frames = frames.to_vec();
    let t = Instant::now();
    let producer = std::thread::spawn(move || {
        for f in frames {
            tx.blocking_send(f).unwrap();
        }
    });
    let n = send_all(l.addr, l.client.clone(), rx, ack_tx).await;
    let d = t.elapsed();
    producer.join().unwrap();
    assert!(n > 0);
    (d, l.got.recv().await.unwrap())
}

async fn pipeline_round(
    l: &mut Link,
    input: &Arc<LogInput>,
    merge: bool,
) -> (Duration, Vec<u8>, u64) {
    let (tx, rx) = mpsc::channel(1024);
    let (ack_tx, ack_rx) = std::sync::mpsc::channel();
    let dir = tempfile::Builder::new()
        .prefix("delegate-bench-spool-")
        .tempdir()
        .unwrap();
    let spool_dir = dir.path().join("spool");
    let inp = input.clone();
    let t = Instant::now();
    let producer =
        std::thread::spawn(move || pipeline_producer(&inp, &spool_dir, tx, ack_rx, merge));
    let n = send_all(l.addr, l.client.clone(), rx, ack_tx).await;
    let d = t.elapsed();
    let frames = producer.join().unwrap();
    assert_eq!(n, frames, "the receiver got every frame");
    (d, l.got.recv().await.unwrap(), frames)
}

async fn logs() {
    let input = Arc::new(log_input());
    let raw = raw_frames(&input);
    let mut l = link().await;

    // Stage costs on one thread, no network, to explain the end-to-end ratio.
    let secrets: Vec<&str> = input.secrets.iter().map(String::as_str).collect();
    let t = Instant::now();
    let mut redactor = Redactor::new(&secrets).unwrap().stream();
    let mut lines = LineSplitter::default();
    let mut n_lines = 0;
    for chunk in &input.chunks {
        n_lines += lines.push(&redactor.push(chunk)).len();
    }
    n_lines += lines.push(&redactor.finish()).len();
    let redact_rate = mbps(input.bytes, t.elapsed());
    let dir = tempfile::tempdir().unwrap();
    let keyring = KeyRing::from_key("bench", &random_key()).unwrap();
    let (spool, _) = Spool::open(SpoolSettings::new(dir.path().join("spool")), keyring).unwrap();
    let mut ts = spool.task(Uuid::new_v4());
    let t = Instant::now();
    for (i, f) in raw.iter().enumerate() {
        let seq = i as u64 + 1;
        ts.append(
            &[RecordBody::Frame {
                seq,
                frame: WireFrame::Binary(f.clone()),
                done: false,
            }],
            false,
        )
        .unwrap();
        if seq.is_multiple_of(ACK_EVERY) {
            ts.ack(seq, false).unwrap();
        }
    }
    let spool_rate = mbps(input.bytes, t.elapsed());
    drop(ts);
    drop(spool);

    let mut raw_rates = Vec::new();
    let mut ours_rates = Vec::new();
    let mut merged_rates = Vec::new();
    let mut merged_frames = 0;
    let mut frames = 0;
    let mut leaked = 0;
    let mut redactions = 0;
    for round in 0..LOG_ROUNDS {
        let (d, got) = raw_round(&mut l, &raw).await;
        raw_rates.push(mbps(input.bytes, d));
        if round == 0 {
            let original: Vec<u8> = input.chunks.concat();
            assert!(got == original, "the raw link delivered the text unchanged");
        }
        let (d, got, n) = pipeline_round(&mut l, &input, false).await;
        ours_rates.push(mbps(input.bytes, d));
        frames = n;
        if round == 0 {
            leaked = input
                .secrets
                .iter()
                .map(|s| count(&got, s.as_bytes()))
                .sum::<usize>();
            redactions = count(&got, REPLACEMENT);
        }
        let (d, got, n) = pipeline_round(&mut l, &input, true).await;
        merged_rates.push(mbps(input.bytes, d));
        merged_frames = n;
        if round == 0 {
            leaked += input
                .secrets
                .iter()
                .map(|s| count(&got, s.as_bytes()))
                .sum::<usize>();
            assert_eq!(
                count(&got, REPLACEMENT),
                redactions,
                "merging changes no byte"
            );
        }
    }
    l.server.abort();
    let (r, o) = (median(&mut raw_rates), median(&mut ours_rates));
    let m = median(&mut merged_rates);
    println!(
        "logs: {:.1} MB of tofu-like text, {frames} lines -> one Log frame each, read in {} KiB chunks; 5 secrets, {} occurrences planted (raw and base64)",
        input.bytes as f64 / 1e6,
        READ_CHUNK / 1024,
        input.planted
    );
    println!(
        "logs: stages on one thread, no network: redact (StreamRedactor) + line split {redact_rate:.0} MB/s; sealed spool append (delegate_agent::spool::TaskSpool, one record per frame, ack every {ACK_EVERY}) {spool_rate:.1} MB/s ({n_lines} lines)"
    );
    println!(
        "logs: raw link (pre-encoded Log frames, TLS 1.3 WebSocket on loopback, one message per frame): {r:.1} MB/s"
    );
    println!(
        "logs: redact + sealed spool + outbox + send over the same link: {o:.1} MB/s; ratio {:.2} of baseline (median of {LOG_ROUNDS} alternating rounds); downstream: {redactions} x [REDACTED], {leaked} secret occurrences",
        o / r
    );
    println!(
        "logs: the same with the lines of each read merged as the task driver merges queued output (at most {} KiB a frame, {merged_frames} frames): {m:.1} MB/s; ratio {:.2} of baseline",
        COALESCE_BYTES / 1024,
        m / r
    );
    assert_eq!(leaked, 0, "a secret reached the receiver");
}
