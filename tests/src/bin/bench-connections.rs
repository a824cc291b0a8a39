//! `bench/connections`: a real user's `kiln runs` beside N idle TLS connections from one
//! other address (127.0.0.2) that complete the handshake and then say nothing, on a
//! release coordinator with TLS and authentication (its defaults). Prints a table.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_tests::secure::{SecureCluster, User};
use kiln_tests::text;

fn arg(name: &str, default: usize) -> usize {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .map(|n| n.parse().unwrap_or_else(|_| panic!("{name} N")))
        .unwrap_or(default)
}

/// `kiln runs` `n` times: (median, max) in ms; every call must succeed.
fn runs_latency(user: &User, n: usize) -> (f64, f64) {
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            let started = Instant::now();
            let output = user.kiln(&["runs"]);
            assert!(output.status.success(), "{}", text(&output.stderr));
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[ms.len() - 1])
}

/// A TLS client connection from 127.0.0.2 that completes its handshake, or `None` when the
/// coordinator closed it first.
fn idle_tls(
    runtime: &tokio::runtime::Runtime,
    config: &Arc<rustls::ClientConfig>,
    target: SocketAddr,
) -> Option<TcpStream> {
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        socket.bind("127.0.0.2:0".parse().ok()?).ok()?;
        socket.connect(target).await.ok()?.into_std().ok()
    })?;
    let mut stream = stream;
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let name = rustls::pki_types::ServerName::IpAddress(target.ip().into());
    let mut tls = rustls::ClientConnection::new(config.clone(), name).expect("client");
    while tls.is_handshaking() {
        match tls.complete_io(&mut stream) {
            Ok((0, 0)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
    // Nothing more is sent: the connection idles until dropped.
    Some(stream)
}

fn main() {
    let connections = arg("--connections", 20_000);
    let samples = arg("--samples", 10);
    kiln_proto::tls::install_provider();
    let cluster = SecureCluster::start(&[]);
    let user = cluster.login("ana", "member");
    let target = cluster.socket_addr();
    let mut roots = rustls::RootCertStore::empty();
    for cert in kiln_proto::tls::certificates(&cluster.ca_pem()).expect("CA") {
        roots.add(cert).expect("CA cert");
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(kiln_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    let before = runs_latency(&user, samples);
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut held = Vec::new();
    let mut refused = 0usize;
    for _ in 0..connections {
        match idle_tls(&runtime, &config, target) {
            Some(stream) => held.push(stream),
            None => refused += 1,
        }
    }
    let opening = started.elapsed();
    let during = runs_latency(&user, samples);
    let pid = cluster.coordinator.pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);

    println!(
        "Kiln connections benchmark — {} coordinator with TLS (default caps: \
         max_connections 8192, max_connections_per_ip 1024); nproc {}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<58} | {:>22}", "metric", "measured");
    println!("{:-<58}-+-{:->22}", "", "");
    let row = |name: &str, value: String| println!("{name:<58} | {value:>22}");
    row(
        "idle TLS connections tried from 127.0.0.2",
        format!("{connections}"),
    );
    row(
        "  handshake completed and held (admitted)",
        format!("{}", held.len()),
    );
    row(
        "  closed by the coordinator (over the cap)",
        format!("{refused}"),
    );
    row(
        "  time to try them all",
        format!("{:.1} s", opening.as_secs_f64()),
    );
    row(
        "coordinator open fds / RSS while held",
        format!("{fds} / {:.1} MiB", rss_kib as f64 / 1024.0),
    );
    row(
        &format!("kiln runs (127.0.0.1), before: median / max of {samples}"),
        format!("{:.0} / {:.0} ms", before.0, before.1),
    );
    row(
        &format!("kiln runs (127.0.0.1), while held: median / max of {samples}"),
        format!("{:.0} / {:.0} ms", during.0, during.1),
    );
    println!(
        "note: target: a real user's `kiln runs` answers within 1 s beside 20,000 idle TLS connections"
    );
    drop(held);
}
