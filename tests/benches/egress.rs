//! `cargo bench -p delegate-tests --bench egress [-- SECTION...]`
//!
//! The egress proxy's cost, each figure a ratio against a direct connection measured in the same
//! run on the same machine (loopback upstream, so the proxy's own work dominates):
//! - `throughput`: bytes through a CONNECT tunnel vs straight to the upstream;
//! - `latency`: connect + one round trip, through the proxy (TCP connect, CONNECT, 200) vs direct;
//! - `tunnels`: 200 tunnels opened and held at once, each proven alive by a round trip after all
//!   are open.
//!
//! The proxy is the agent's own (`EgressProxy`), with a policy that allows only the loopback
//! upstream (`127.0.0.1/32`, an explicit network rule: loopback is refused otherwise). Nothing
//! leaves loopback.

use base64::Engine;
use delegate_agent::egress::proxy::{
    EgressProxy, EgressRecord, ProxyConfig, StaticResolver, TaskCredentials,
};
use delegate_agent::egress::rules::Policy;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bench = Bench::start().await;
        if want("throughput") {
            bench.throughput().await;
        }
        if want("latency") {
            bench.latency().await;
        }
        if want("tunnels") {
            bench.tunnels(200).await;
        }
    });
}

struct Bench {
    upstream: SocketAddr,
    proxy: EgressProxy,
    auth: String,
}

/// The upstream: per connection, `s` then a sink (reads everything, answers with the byte count
/// when the client half-closes), or `p` then ping-pong (echoes single bytes until EOF).
async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                if s.read_exact(&mut mode).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 256 * 1024];
                if mode[0] == b's' {
                    let mut total: u64 = 0;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = s.write_all(&total.to_be_bytes()).await;
                } else {
                    let mut b = [0u8; 1];
                    while s.read_exact(&mut b).await.is_ok() {
                        if s.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    addr
}

impl Bench {
    async fn start() -> Bench {
        let upstream = upstream().await;
        let (tx, mut rx) = mpsc::channel::<EgressRecord>(4096);
        // Records are consumed as the agent consumes them; their content is not measured.
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let mut config = ProxyConfig::new("127.0.0.1:0".parse().unwrap(), vec![]);
        config.max_connections = 512;
        let proxy = EgressProxy::start(config, Arc::new(StaticResolver::new()), tx)
            .await
            .unwrap();
        let policy = Policy::parse(&["127.0.0.1/32".to_string()], &[]).unwrap();
        let creds: TaskCredentials = proxy.register("bench", policy, None).unwrap();
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", creds.user, creds.password));
        Bench {
            upstream,
            proxy,
            auth,
        }
    }

    async fn direct(&self) -> TcpStream {
        let s = TcpStream::connect(self.upstream).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// A CONNECT tunnel to the upstream, past the proxy's 200.
    async fn tunnel(&self) -> TcpStream {
        let mut s = TcpStream::connect(self.proxy.local_addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        let req = format!(
            "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: Basic {1}\r\n\r\n",
            self.upstream, self.auth
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        s
    }

    async fn throughput(&self) {
        const TOTAL: u64 = 256 << 20;
        let chunk = vec![0x5au8; 256 * 1024];
        let send = |mut s: TcpStream| {
            let chunk = chunk.clone();
            async move {
                let t = Instant::now();
                s.write_all(b"s").await.unwrap();
                let mut sent = 0;
                while sent < TOTAL {
                    s.write_all(&chunk).await.unwrap();
                    sent += chunk.len() as u64;
                }
                s.shutdown().await.unwrap();
                let mut got = [0u8; 8];
                s.read_exact(&mut got).await.unwrap();
                assert_eq!(u64::from_be_bytes(got), TOTAL);
                t.elapsed()
            }
        };
        // Warm up both paths once, then best of three each.
        send(self.direct().await).await;
        send(self.tunnel().await).await;
        let mut direct = Duration::MAX;
        let mut proxied = Duration::MAX;
        for _ in 0..3 {
            direct = direct.min(send(self.direct().await).await);
            proxied = proxied.min(send(self.tunnel().await).await);
        }
        let mib = (TOTAL >> 20) as f64;
        let rate = |d: Duration| mib / d.as_secs_f64();
        println!(
            "throughput: direct {:.0} MiB/s, through the proxy {:.0} MiB/s: ratio {:.2} (proxy/direct; 1.0 = no cost)",
            rate(direct),
            rate(proxied),
            rate(proxied) / rate(direct)
        );
    }

    async fn latency(&self) {
        const N: usize = 2000;
        async fn round_trip(mut s: TcpStream) {
            s.write_all(b"p").await.unwrap();
            s.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
        }
        for _ in 0..50 {
            round_trip(self.direct().await).await;
            round_trip(self.tunnel().await).await;
        }
        let mut direct = Vec::with_capacity(N);
        let mut proxied = Vec::with_capacity(N);
        for _ in 0..N {
            let t = Instant::now();
            round_trip(self.direct().await).await;
            direct.push(t.elapsed());
            let t = Instant::now();
            round_trip(self.tunnel().await).await;
            proxied.push(t.elapsed());
        }
        direct.sort();
        proxied.sort();
        let q = |v: &[Duration], p: f64| v[((v.len() - 1) as f64 * p) as usize];
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        for (name, p) in [("median", 0.5), ("p99", 0.99)] {
            println!(
                "connect latency {name}: direct {:.0} µs, through the proxy {:.0} µs: ratio {:.1} (proxy/direct)",
                us(q(&direct, p)),
                us(q(&proxied, p)),
                us(q(&proxied, p)) / us(q(&direct, p))
            );
        }
    }

    async fn tunnels(&self, n: usize) {
        // Baseline: as many direct connections, opened and held the same way.
        let t = Instant::now();
        let mut direct = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = self.direct().await;
            s.write_all(b"p").await.unwrap();
            direct.push(s);
        }
        let direct_opened = t.elapsed();
        drop(direct);
        let t = Instant::now();
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = self.tunnel().await;
            s.write_all(b"p").await.unwrap();
            held.push(s);
        }
        let opened = t.elapsed();
        // Every tunnel still relays while all are held.
        let t = Instant::now();
        for s in held.iter_mut() {
            s.write_all(b"y").await.unwrap();
        }
        for s in held.iter_mut() {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"y");
        }
        let round = t.elapsed();
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        println!(
            "tunnels: {n} held at once: opened in {:.0} ms ({:.2} ms each) vs {n} direct in {:.0} ms: ratio {:.1}; one round trip on all {n} while held in {:.1} ms; process RSS {rss} (bench, upstream and proxy together)",
            opened.as_secs_f64() * 1e3,
            opened.as_secs_f64() * 1e3 / n as f64,
            direct_opened.as_secs_f64() * 1e3,
            opened.as_secs_f64() / direct_opened.as_secs_f64(),
            round.as_secs_f64() * 1e3,
        );
        drop(held);
    }
}
