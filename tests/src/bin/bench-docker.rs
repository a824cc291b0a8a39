//! `bench/docker`: submit → first log line for a Docker run from a cached image against a
//! user-managed run, on one real coordinator and agent (release build). Prints one table.
//!
//! Usage: bench-docker [--runs N]   (bench/docker builds it and the image first)

use std::time::{Duration, Instant};

use kiln_proto::{Address, v1};
use kiln_tests::docker::TEST_IMAGE;
use kiln_tests::{AgentSpec, Cluster, grpc, write_tree};

fn main() {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .map(|n| n.parse().expect("--runs N"))
        .unwrap_or(15);
    let cluster = Cluster::start_with_agent_args(
        &[AgentSpec {
            target: "bench",
            slots: 1,
            advertise: None,
        }],
        &["--docker-cpu-image", TEST_IMAGE],
    );
    let src = tempfile::tempdir().expect("temp dir");
    write_tree(src.path(), &[("hello.py", "print('hi')\n")]);
    let user = || v1::SubmitRunRequest {
        target: "bench".into(),
        script: "hello.py".into(),
        ..Default::default()
    };
    let docker = || grpc::docker_run("bench", "hello.py", "cpu");

    // One warm-up each: the snapshot reaches the coordinator and the agent's cache.
    first_line(&cluster.address, src.path(), user());
    first_line(&cluster.address, src.path(), docker());
    let mut user_ms = Vec::new();
    let mut docker_ms = Vec::new();
    for _ in 0..runs {
        user_ms.push(first_line(&cluster.address, src.path(), user()));
        docker_ms.push(first_line(&cluster.address, src.path(), docker()));
    }
    let mut docker_run_ms = Vec::new();
    for _ in 0..runs.min(10) {
        let start = Instant::now();
        let output = std::process::Command::new("docker")
            .args([
                "run",
                "--rm",
                "--init",
                TEST_IMAGE,
                "python3",
                "-c",
                "print('hi')",
            ])
            .output()
            .expect("docker run");
        assert!(output.status.success());
        docker_run_ms.push(ms(start.elapsed()));
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("bench/docker: {runs} runs each, {cpus} CPUs, image {TEST_IMAGE} (cached)");
    println!("| metric | median | p95 |");
    println!("|---|---|---|");
    row(
        "submit → first line, user-managed (/usr/bin/python3)",
        &mut user_ms,
    );
    row(
        "submit → first line, Docker run, cached image",
        &mut docker_ms,
    );
    row(
        "reference: `docker run --rm --init IMAGE python3 -c print` (CLI)",
        &mut docker_run_ms,
    );
    cluster.stop();
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn row(name: &str, samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!("| {name} | {:.0} ms | {:.0} ms |", at(0.5), at(0.95));
}

/// Submits (packing the directory, as `kiln submit` does) and follows the run's log until
/// its first stdout line; returns that time in ms, after waiting for the run to end.
fn first_line(address: &str, dir: &std::path::Path, request: v1::SubmitRunRequest) -> f64 {
    let start = Instant::now();
    let run_id = grpc::submit_request(address, dir, request);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let channel = kiln_proto::connect(&Address::parse(address).expect("address"))
            .await
            .expect("connect");
        let mut stream = kiln_proto::clients::kiln(channel, kiln_proto::Bearer::none())
            .stream_logs(v1::StreamLogsRequest {
                run_id,
                follow: true,
                ..Default::default()
            })
            .await
            .expect("StreamLogs")
            .into_inner();
        let mut first = None;
        while let Some(item) = stream.message().await.expect("log stream") {
            if first.is_none()
                && item
                    .lines
                    .iter()
                    .any(|l| l.stream == v1::LogStream::Stdout as i32)
            {
                first = Some(ms(start.elapsed()));
            }
            if let Some(run) = item.finished {
                assert_eq!(run.status(), v1::RunStatus::Succeeded, "{run:?}");
            }
        }
        first.expect("a stdout line")
    })
}
