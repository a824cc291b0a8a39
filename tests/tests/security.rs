//! TLS, enrollment and authentication end to end: a coordinator with its own CA (its
//! default), agents that join with tokens and then speak mutual TLS only, users with API
//! tokens, and raw gRPC clients with the wrong credentials.

use std::time::Duration;

use kiln_proto::tls::{ClientTls, Trust};
use kiln_proto::v1;
use kiln_tests::secure::{self, SecureCluster, block_on, channel, session};
use kiln_tests::{text, wait_for, write_tree};

/// The scripts below write markers into it, as runs with users of their own.
fn project() -> tempfile::TempDir {
    let dir = kiln_tests::shared_dir();
    write_tree(
        dir.path(),
        &[
            ("hello.py", "print('hello over mTLS', flush=True)\n"),
            (
                "slow.py",
                "import os, time\n\
                 open(os.environ['MARKER'] + '.' + os.environ['KILN_ATTEMPT'], 'w').write(str(os.getpid()))\n\
                 for i in range(6):\n    print('tick', i, flush=True)\n    time.sleep(0.5)\n",
            ),
        ],
    );
    dir
}

/// Every byte of the database files, to look for secrets in.
fn database_bytes(cluster: &SecureCluster) -> Vec<u8> {
    let mut bytes = Vec::new();
    for name in ["kiln.db", "kiln.db-wal"] {
        bytes.extend(std::fs::read(cluster.data_dir().join(name)).unwrap_or_default());
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[test]
fn agents_enroll_with_tokens_and_secrets_are_never_stored() {
    let mut cluster = SecureCluster::start(&[]);
    let join = cluster.join_command("cpu", &["--uses", "1"]);
    let token = join[join.iter().position(|w| w == "--token").unwrap() + 1].clone();

    // A wrong CA hash: the agent refuses the coordinator before it sends the token...
    let mut wrong = join.clone();
    let hash = wrong.iter().position(|w| w == "--ca-hash").unwrap() + 1;
    wrong[hash] = format!("sha256:{}", "ab".repeat(32));
    let output = cluster.join(0, &wrong);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("pinned hash"),
        "{}",
        text(&output.stderr)
    );
    // ... so the token's only use is still there.
    let output = cluster.join(0, &join);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let identity = std::fs::metadata(cluster.agent_data(0).join("identity/agent.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(identity.permissions().mode() & 0o777, 0o600);

    // A second use of a single-use token fails.
    let output = cluster.join(1, &join);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("no uses left"),
        "{}",
        text(&output.stderr)
    );
    // So does an expired one.
    let short = cluster.join_command("cpu", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1300));
    let output = cluster.join(1, &short);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("expired"),
        "{}",
        text(&output.stderr)
    );

    // The enrolled agent works over mutual TLS; a logged-in user runs a script on it.
    cluster.start_agent(0);
    let admin = cluster.login("root", "admin");
    cluster.wait_agent_state(&admin, &cluster.agent_id(0), "online");
    let dir = project();
    let output = admin.kiln(&[
        "submit",
        "--target",
        "cpu",
        dir.path().to_str().unwrap(),
        "hello.py",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("hello over mTLS"));
    let me = admin.kiln(&["whoami"]);
    assert!(
        text(&me.stdout).starts_with("root (admin) at https://"),
        "{}",
        text(&me.stdout)
    );
    let credentials = admin.home.join("kiln/credentials.toml");
    let mode = std::fs::metadata(&credentials)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The database holds neither the join token's secret nor the API token's.
    let db = database_bytes(&cluster);
    for secret in [&token, &admin.token] {
        let secret = secret.split_once('.').unwrap().1;
        assert!(!contains(&db, secret), "a token secret is in the database");
    }
    assert!(
        contains(&db, token.split_once('.').unwrap().0),
        "token ids are stored"
    );
}

#[test]
fn callers_reach_only_their_own_api_and_runs() {
    let mut cluster = SecureCluster::start(&[]);
    let a = cluster.add_agent("cpu");
    let b = cluster.add_agent("cpu");
    let admin = cluster.login("root", "admin");
    let ana = cluster.login("ana", "member");
    let bo = cluster.login("bo", "member");
    cluster.wait_agent_state(&admin, &cluster.agent_id(a), "online");
    cluster.wait_agent_state(&admin, &cluster.agent_id(b), "online");
    let dir = project();
    let path = dir.path().to_str().unwrap();
    let run = ana.submit_detached(&["--target", "cpu", path, "hello.py"]);
    ana.wait_status(run, "succeeded");
    let run_text = run.to_string();

    // Members see and cancel their own runs only; admins every run.
    let listed = bo.json(&["runs", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");
    assert_eq!(ana.json(&["runs", "--json"]).as_array().unwrap().len(), 1);
    assert_eq!(admin.json(&["runs", "--json"])[0]["owner"], "ana");
    for args in [
        vec!["cancel", run_text.as_str()],
        vec!["show", run_text.as_str()],
        vec!["logs", run_text.as_str()],
    ] {
        let output = bo.kiln(&args);
        assert!(!output.status.success(), "bo ran {args:?}");
        assert!(
            text(&output.stderr).contains("belongs to `ana`"),
            "{}",
            text(&output.stderr)
        );
    }
    assert!(admin.kiln(&["cancel", &run_text]).status.success());
    let output = ana.kiln(&["agents", "revoke", &cluster.agent_id(b)]);
    assert!(
        text(&output.stderr).contains("only admins"),
        "{}",
        text(&output.stderr)
    );

    let address = cluster.address.clone();
    block_on(async {
        // No credentials at all.
        let anonymous = channel(&address, &cluster.anonymous()).await.unwrap();
        let status = kiln_proto::clients::kiln(anonymous.clone(), kiln_proto::Bearer::none())
            .list_runs(v1::ListRunsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        let status = session(anonymous.clone(), "a-x", "cpu").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        // A mistyped token.
        let bad = format!("{}.{}", "0".repeat(16), "1".repeat(32));
        let status =
            kiln_proto::clients::kiln(anonymous.clone(), kiln_proto::Bearer::new(&bad).unwrap())
                .list_runs(v1::ListRunsRequest::default())
                .await
                .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

        // A user token cannot call the agent API...
        let mut agent_api = kiln_proto::clients::agent(anonymous.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(tx);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", admin.token).parse().unwrap(),
        );
        let status = agent_api.session(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

        // ... and an agent certificate cannot call the user API.
        let as_a = channel(&address, &cluster.agent_tls(a)).await.unwrap();
        let status = kiln_proto::clients::kiln(as_a.clone(), kiln_proto::Bearer::none())
            .list_runs(v1::ListRunsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

        // Agent A cannot pass for agent B...
        let status = session(as_a.clone(), &cluster.agent_id(b), "cpu")
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("belongs to agent"), "{status:?}");
    });

    // ... nor report on B's run: lines A sends about a run held by B are dropped.
    let marker = dir.path().join("marker");
    let marker_env = format!("MARKER={}", marker.display());
    let long = ana.submit_detached(&["--target", "cpu", "--env", &marker_env, path, "slow.py"]);
    let running = ana.wait_status(long, "running");
    let holder = running["agent"].as_str().unwrap().to_string();
    let other = if holder == cluster.agent_id(a) { b } else { a };
    let other_id = cluster.agent_id(other);
    let other_tls = cluster.agent_tls(other);
    // (The other agent stops first: its identity has one session at a time.)
    cluster.agents[other].as_mut().unwrap().stop_cleanly();
    // Stopped with SIGTERM and no runs, it said goodbye: stopped, its session closed.
    cluster.wait_agent_state(&admin, &other_id, "stopped");
    block_on(async {
        let as_other = channel(&address, &other_tls).await.unwrap();
        let (tx, _inbound) = session(as_other, &other_id, "cpu").await.unwrap();
        tx.send(v1::AgentMessage {
            kind: Some(v1::agent_message::Kind::Logs(v1::LogBatch {
                run_id: long,
                attempt: 1,
                lines: vec![v1::LogLine {
                    seq: 1,
                    stream: v1::LogStream::Stdout as i32,
                    text: "FORGED LINE".into(),
                    ..Default::default()
                }],
            })),
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    ana.wait_status(long, "succeeded");
    let logs = ana.kiln(&["logs", &long.to_string()]);
    let logs = text(&logs.stdout);
    assert!(logs.contains("tick 5"), "{logs}");
    assert!(!logs.contains("FORGED"), "{logs}");

    // A certificate from another cluster's CA is refused at the handshake.
    let mut stranger = SecureCluster::start(&[]);
    let s = stranger.add_agent("cpu");
    let foreign = ClientTls {
        identity: Some(secure::stored_identity(&stranger.agent_data(s))),
        trust: Trust::CaPem(cluster.ca_pem()),
    };
    block_on(async {
        let refused = match channel(&address, &foreign).await {
            Err(_) => true,
            Ok(channel) => session(channel, "a-x", "cpu").await.is_err(),
        };
        assert!(refused, "a foreign certificate was accepted");
    });
    // And a client trusting another CA does not trust this coordinator.
    let status = block_on(channel(&address, &stranger.anonymous())).unwrap_err();
    assert!(status.contains("certificate"), "{status}");
}

#[test]
fn a_revoked_agent_is_refused_its_run_requeued_and_its_key_deleted() {
    let mut cluster = SecureCluster::start(&[]);
    let a = cluster.add_agent("cpu");
    let admin = cluster.login("root", "admin");
    cluster.wait_agent_state(&admin, &cluster.agent_id(a), "online");
    let dir = project();
    let marker = dir.path().join("marker");
    let marker_env = format!("MARKER={}", marker.display());
    let run = admin.submit_detached(&[
        "--target",
        "cpu",
        "--env",
        &marker_env,
        dir.path().to_str().unwrap(),
        "slow.py",
    ]);
    admin.wait_status(run, "running");
    let first = marker.with_extension("1");
    let pid: i32 = wait_for("the first attempt's pid", Duration::from_secs(20), || {
        std::fs::read_to_string(&first).ok()?.parse().ok()
    });
    let old_identity = cluster.agent_tls(a);
    let old_id = cluster.agent_id(a);

    // A second agent joins; then the first is revoked while its run is going.
    let b = cluster.add_agent("cpu");
    cluster.wait_agent_state(&admin, &cluster.agent_id(b), "online");
    let output = admin.kiln(&["agents", "revoke", &old_id]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    cluster.wait_agent_state(&admin, &old_id, "revoked");

    // The run is requeued onto the other agent and finishes there.
    let done = admin.wait_status(run, "succeeded");
    assert_eq!(done["attempt"], 2, "{done}");
    assert_eq!(done["agent"], cluster.agent_id(b).as_str());
    // The revoked agent stopped the first attempt's process and deleted its key.
    wait_for(
        "the revoked run's process to stop",
        Duration::from_secs(15),
        || (!kiln_tests::process_alive(pid)).then_some(()),
    );
    wait_for("the key to be deleted", Duration::from_secs(10), || {
        (!cluster.agent_data(a).join("identity/agent.pem").exists()).then_some(())
    });
    assert!(
        cluster.agent_log(a).contains("This agent was revoked"),
        "{}",
        cluster.agent_log(a)
    );
    // Its certificate (a copy kept here) is refused from now on.
    let address = cluster.address.clone();
    block_on(async {
        let channel = channel(&address, &old_identity).await.unwrap();
        let status = session(channel, &old_id, "cpu").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("revoked"), "{status:?}");
    });
    // The revoked agent waits for a new join instead of dialling in a loop.
    std::thread::sleep(Duration::from_secs(3));
    let attempts = cluster
        .agent_log(a)
        .matches("needs a new join token")
        .count();
    assert!(attempts <= 2, "{attempts} attempts in 3 s");
}

#[test]
fn certificates_are_renewed_and_an_expired_one_needs_a_new_join() {
    let mut cluster = SecureCluster::start(&["--agent-cert-ttl", "6"]);
    let a = cluster.add_agent("cpu");
    let admin = cluster.login("root", "admin");
    let first_id = cluster.agent_id(a);
    cluster.wait_agent_state(&admin, &first_id, "online");
    let before = secure::stored_identity(&cluster.agent_data(a));

    // At two thirds of its 6 s the agent gets a new certificate for a new key.
    wait_for("a renewal", Duration::from_secs(15), || {
        cluster
            .agent_log(a)
            .contains("Certificate renewed")
            .then_some(())
    });
    let after = secure::stored_identity(&cluster.agent_data(a));
    assert_ne!(before.0, after.0, "the certificate changed");
    assert_ne!(before.1, after.1, "the key changed");
    // The renewed identity connects: restart the agent on it and run something.
    cluster.agents[a].as_mut().unwrap().stop_cleanly();
    cluster.start_agent(a);
    cluster.wait_agent_state(&admin, &first_id, "online");
    let dir = project();
    let run = admin.submit_detached(&["--target", "cpu", dir.path().to_str().unwrap(), "hello.py"]);
    admin.wait_status(run, "succeeded");

    // The host is off longer than the certificate lives: on start the agent backs off
    // instead of dialling, and says what to do.
    cluster.agents[a].as_mut().unwrap().stop_cleanly();
    // Its certificate lives 6 s from its last renewal (every 4 s): 7 s is past its end.
    std::thread::sleep(Duration::from_secs(7));
    cluster.start_agent(a);
    std::thread::sleep(Duration::from_secs(4));
    let log = cluster.agent_log(a);
    let refusals = log.matches("its certificate expired").count();
    assert!(
        (1..=2).contains(&refusals),
        "{refusals} attempts in 4 s:\n{log}"
    );
    assert!(!log[log.rfind("Agent starting").unwrap()..].contains("Connected to the coordinator"));

    // A new join gives the host a new identity; the old one is recorded for clean-up.
    let join = cluster.join_command("cpu", &[]);
    cluster.agents[a].as_mut().unwrap().stop_cleanly();
    let output = cluster.join(a, &join);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let second_id = cluster.agent_id(a);
    assert_ne!(second_id, first_id);
    cluster.start_agent(a);
    cluster.wait_agent_state(&admin, &second_id, "online");
    // The old identity's containers are removed (none here) and the record of it with them.
    let previous = cluster.agent_data(a).join("previous-agent-ids");
    wait_for(
        "the previous identity to be cleaned up",
        Duration::from_secs(20),
        || (!previous.exists()).then_some(()),
    );
}

/// `HasBlob` as the caller on `channel` with `token` (none: the channel's certificate).
async fn has_blob(channel: &tonic::transport::Channel, token: Option<&str>, digest: &str) -> bool {
    let bearer = token.map_or_else(kiln_proto::Bearer::none, |t| {
        kiln_proto::Bearer::new(t).unwrap()
    });
    let reply = kiln_proto::clients::blobs(channel.clone(), bearer)
        .has_blob(v1::HasBlobRequest {
            digest: digest.to_string(),
        })
        .await
        .expect("HasBlob answers")
        .into_inner();
    assert_eq!(reply.present, reply.size > 0, "{reply:?}");
    reply.present
}

/// `DownloadBlob` as the user with `token`: the bytes, or the refusal.
async fn download_blob(
    channel: &tonic::transport::Channel,
    token: &str,
    digest: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream =
        kiln_proto::clients::blobs(channel.clone(), kiln_proto::Bearer::new(token).unwrap())
            .download_blob(v1::DownloadBlobRequest {
                digest: digest.to_string(),
            })
            .await?
            .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        bytes.extend(chunk.data);
    }
    Ok(bytes)
}

/// `SubmitRun` of `out.py` on `snapshot` as the user with `token`.
async fn submit_on(
    channel: &tonic::transport::Channel,
    token: &str,
    snapshot: &str,
) -> Result<v1::Run, tonic::Status> {
    kiln_proto::clients::kiln(channel.clone(), kiln_proto::Bearer::new(token).unwrap())
        .submit_run(v1::SubmitRunRequest {
            target: "cpu".into(),
            script: "out.py".into(),
            snapshot_digest: snapshot.to_string(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[test]
fn a_member_reads_only_blobs_they_uploaded_or_their_runs_name() {
    let mut cluster = SecureCluster::start(&[]);
    let a = cluster.add_agent("cpu");
    let admin = cluster.login("root", "admin");
    let ana = cluster.login("ana", "member");
    let bo = cluster.login("bo", "member");
    cluster.wait_agent_state(&admin, &cluster.agent_id(a), "online");
    let dir = tempfile::tempdir().unwrap();
    write_tree(
        dir.path(),
        &[(
            "out.py",
            "import os\n\
             out = os.environ.get('KILN_OUTPUTS_DIR', 'outputs')\n\
             os.makedirs(out, exist_ok=True)\n\
             open(os.path.join(out, 'model.bin'), 'w').write('the weights of ana')\n",
        )],
    );
    let path = dir.path().to_str().unwrap();
    let run = ana.submit_detached(&["--target", "cpu", path, "out.py"]);
    let done = ana.wait_status(run, "succeeded");
    let snapshot = done["snapshot_digest"].as_str().unwrap().to_string();
    let outputs = done["outputs_digest"].as_str().unwrap().to_string();
    let missing = format!("sha256:{}", "0".repeat(64));

    let address = cluster.address.clone();
    let agent_tls = cluster.agent_tls(a);
    block_on(async {
        let users = channel(&address, &cluster.anonymous()).await.unwrap();
        let (missing_download, missing_submit) = (
            download_blob(&users, &bo.token, &missing)
                .await
                .unwrap_err(),
            submit_on(&users, &bo.token, &missing).await.unwrap_err(),
        );
        assert_eq!(missing_download.code(), tonic::Code::NotFound);
        assert_eq!(missing_submit.code(), tonic::Code::FailedPrecondition);
        let like_missing = |status: &tonic::Status, digest: &str, missing: &tonic::Status| {
            assert_eq!(status.code(), missing.code(), "{status:?}");
            assert_eq!(
                status.message().replace(digest, "D"),
                missing.message().replace(&missing_digest(missing), "D"),
            );
        };
        for digest in [&snapshot, &outputs] {
            // Bo cannot tell ana's blobs from missing ones, fetch them, or run on them.
            assert!(!has_blob(&users, Some(&bo.token), digest).await, "{digest}");
            let refused = download_blob(&users, &bo.token, digest).await.unwrap_err();
            like_missing(&refused, digest, &missing_download);
            let refused = submit_on(&users, &bo.token, digest).await.unwrap_err();
            like_missing(&refused, digest, &missing_submit);
            // Ana and the admin can.
            for token in [&ana.token, &admin.token] {
                assert!(has_blob(&users, Some(token), digest).await, "{digest}");
                assert!(
                    !download_blob(&users, token, digest)
                        .await
                        .unwrap()
                        .is_empty()
                );
            }
        }
        // An agent holding no run of ana's does not see them either.
        let as_agent = channel(&address, &agent_tls).await.unwrap();
        assert!(!has_blob(&as_agent, None, &snapshot).await);
    });
    let dest = dir.path().join("stolen");
    let output = bo.kiln(&["download", &run.to_string(), dest.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(!dest.join("model.bin").exists());

    // Bo, who has the same files, uploads them (the coordinator does not take his word
    // for it) and runs on them; ana's run and outputs are still hers.
    let output = bo.kiln(&["submit", "--target", "cpu", path, "out.py"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let uploaded = text(&output.stderr);
    assert!(!uploaded.contains("uploaded 0 bytes"), "{uploaded}");
    block_on(async {
        let users = channel(&address, &cluster.anonymous()).await.unwrap();
        assert!(has_blob(&users, Some(&bo.token), &snapshot).await);
        submit_on(&users, &bo.token, &snapshot).await.unwrap();
    });
    let output = ana.kiln(&["download", &run.to_string(), dest.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        std::fs::read_to_string(dest.join("model.bin")).unwrap(),
        "the weights of ana"
    );
}

/// The digest a refusal's message names.
fn missing_digest(status: &tonic::Status) -> String {
    let start = status.message().find("sha256:").expect("a digest");
    status.message()[start..start + 7 + 64].to_string()
}

/// How many sessions agent `index` has opened so far (its log accumulates across restarts).
fn sessions_opened(cluster: &SecureCluster, index: usize) -> usize {
    cluster
        .agent_log(index)
        .matches("Connected to the coordinator")
        .count()
}

#[test]
fn a_copied_agent_key_cannot_open_a_second_session() {
    let mut cluster = SecureCluster::start(&[]);
    let a = cluster.add_agent("cpu");
    let admin = cluster.login("root", "admin");
    let ana = cluster.login("ana", "member");
    let id = cluster.agent_id(a);
    cluster.wait_agent_state(&admin, &id, "online");

    // A copy of the agent's key, on another machine, says hello with more slots to be given
    // other users' runs. The live agent keeps its session; the copy is refused, again and
    // again (the real agent's heartbeats keep its session live).
    let stolen = cluster.agent_tls(a);
    let address = cluster.address.clone();
    block_on(async {
        let channel = channel(&address, &stolen).await.unwrap();
        let mut hello = secure::intruder_hello(&id, "cpu");
        hello.slots = 64;
        hello.boot_id = "another-boot".into();
        hello.pid = 4242;
        for _ in 0..4 {
            match secure::session_with(channel.clone(), hello.clone()).await {
                Ok(_) => panic!("a second session with agent {id}'s key was accepted"),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
                    assert!(
                        status.message().contains("already has a live session"),
                        "{status:?}"
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    });
    // The coordinator flags it for an admin, who may revoke the agent.
    let listed = admin.json(&["agents", "--json"]);
    let agent = &listed[0];
    assert_eq!(agent["id"], id.as_str(), "{listed}");
    assert_eq!(agent["state"], "online", "{listed}");
    assert_eq!(agent["slots"], 1, "{listed}");
    let conflict = agent["conflict"]["what"].as_str().unwrap_or_default();
    assert!(conflict.contains("possible cloned agent key"), "{listed}");
    assert!(conflict.contains("pid 4242"), "{listed}");
    let shown = text(&admin.kiln(&["agents", "show", &id]).stdout);
    assert!(shown.contains("kiln agents revoke"), "{shown}");
    let log = cluster.coordinator.log_text();
    assert!(log.contains("possible cloned agent key"), "{log}");

    // Another user's run, with a secret in its environment, goes to the real agent.
    let dir = project();
    let path = dir.path().to_str().unwrap();
    let run = ana.submit_detached(&[
        "--target",
        "cpu",
        "--env",
        "SECRET=s3cret",
        path,
        "hello.py",
    ]);
    let done = ana.wait_status(run, "succeeded");
    assert_eq!(done["agent"], id.as_str());
    let logs = text(&ana.kiln(&["logs", &run.to_string()]).stdout);
    assert!(logs.contains("hello over mTLS"), "{logs}");

    // The real agent still gets back in at once after a restart and after a crash (its
    // new process is another instance; the old one's connection closed).
    for crash in [false, true] {
        let before = sessions_opened(&cluster, a);
        let daemon = cluster.agents[a].as_mut().unwrap();
        if crash {
            daemon.kill();
        } else {
            daemon.stop_cleanly();
        }
        let started = std::time::Instant::now();
        cluster.start_agent(a);
        wait_for("the agent to reconnect", Duration::from_secs(20), || {
            (sessions_opened(&cluster, a) > before).then_some(())
        });
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?} (crash: {crash})",
            started.elapsed()
        );
    }
    let run = ana.submit_detached(&["--target", "cpu", path, "hello.py"]);
    ana.wait_status(run, "succeeded");
}

/// Every regular file below `dir` (not following symlinks), with its bytes.
fn files_below(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        } else if metadata.is_file() {
            files.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    files
}

#[test]
fn outputs_never_carry_what_their_symlinks_point_at() {
    let mut cluster = SecureCluster::start(&[]);
    let agent = cluster.add_agent("cpu");
    let ana = cluster.login("ana", "member");
    let identity = cluster.agent_data(agent).join("identity");
    let (_, key) = secure::stored_identity(&cluster.agent_data(agent));
    let dir = tempfile::tempdir().unwrap();
    write_tree(
        dir.path(),
        &[
            // outputs/ itself becomes a link to the agent's identity, or to its key.
            (
                "swap_dir.py",
                "import os, shutil\no = os.environ['KILN_OUTPUTS_DIR']\nshutil.rmtree(o)\n\
                 os.symlink(os.environ['IDENTITY'], o)\n",
            ),
            (
                "swap_file.py",
                "import os, shutil\no = os.environ['KILN_OUTPUTS_DIR']\nshutil.rmtree(o)\n\
                 os.symlink(os.environ['IDENTITY'] + '/agent.pem', o)\n",
            ),
            // Links inside outputs/: to the key, to the identity directory, and one that stays inside.
            (
                "links.py",
                "import os\no = os.environ['KILN_OUTPUTS_DIR']\nident = os.environ['IDENTITY']\n\
                 open(o + '/model.txt', 'w').write('weights')\n\
                 os.symlink(ident + '/agent.pem', o + '/key.pem')\n\
                 os.symlink(ident, o + '/identity')\n\
                 os.makedirs(o + '/sub')\n\
                 os.symlink('../../../../identity/agent.pem', o + '/sub/up.pem')\n\
                 os.symlink('../model.txt', o + '/sub/model.txt')\n",
            ),
        ],
    );
    let path = dir.path().to_str().unwrap();
    let identity_env = format!("IDENTITY={}", identity.display());
    let key_body = key.lines().nth(1).unwrap().to_string();
    for script in ["swap_dir.py", "swap_file.py", "links.py"] {
        let run = ana.submit_detached(&["--target", "cpu", "--env", &identity_env, path, script]);
        // The run ends (its outputs are not retried for ever) and keeps what it may.
        ana.wait_status(run, "succeeded");
        let dest = dir.path().join(format!("downloaded-{script}"));
        let output = ana.kiln(&["download", &run.to_string(), dest.to_str().unwrap()]);
        if script == "links.py" {
            assert!(output.status.success(), "{}", text(&output.stderr));
            assert_eq!(
                std::fs::read_to_string(dest.join("model.txt")).unwrap(),
                "weights"
            );
            assert_eq!(
                std::fs::read_link(dest.join("sub/model.txt")).unwrap(),
                std::path::Path::new("../model.txt")
            );
            for gone in ["key.pem", "identity", "sub/up.pem"] {
                assert!(
                    std::fs::symlink_metadata(dest.join(gone)).is_err(),
                    "{gone} was kept"
                );
            }
        } else {
            assert!(
                !output.status.success(),
                "{script}: outputs were downloaded"
            );
            let stderr = text(&output.stderr);
            assert!(
                stderr.contains("outputs not kept") && stderr.contains("symlink"),
                "{script}: {stderr}"
            );
        }
        for (file, bytes) in files_below(&dest) {
            assert!(
                !contains(&bytes, &key_body),
                "{script}: {} holds the agent's key",
                file.display()
            );
        }
    }
    let log = cluster.agent_log(agent);
    assert!(log.contains("Left out of the packed directory"), "{log}");
}

/// Every file, directory and socket below `root` (itself included) that grants anything to
/// its group or to others, with its mode; symlinks are not followed.
fn open_to_others(root: &std::path::Path, except: &[&std::path::Path]) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        if except.iter().any(|skip| path.starts_with(skip)) {
            continue;
        }
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue; // gone meanwhile
        };
        if metadata.is_symlink() {
            continue;
        }
        let mode = metadata.permissions().mode() & 0o777;
        // A directory others may only pass through (x, not r or w: 0711, on the way to a
        // run user's own directory) shows them nothing.
        let shown = if metadata.is_dir() { 0o066 } else { 0o077 };
        if mode & shown != 0 {
            found.push(format!("{} {mode:o}", path.display()));
        }
        if metadata.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|entry| entry.path()));
        }
    }
    found
}

#[test]
fn daemons_keep_their_files_private_whatever_the_umask() {
    // As an operator starting them by hand would (files 0644, directories 0755).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let mut cluster = SecureCluster::start(&[]);
    let agent = cluster.add_agent("cpu");
    let ana = cluster.login("ana", "member");
    let dir = tempfile::tempdir().unwrap();
    write_tree(
        dir.path(),
        &[(
            "wait.py",
            "import os, time\n\
             open(os.path.join(os.environ['KILN_OUTPUTS_DIR'], 'result.txt'), 'w').write('42')\n\
             open(os.environ['STARTED'], 'w').write('1')\n\
             while not os.path.exists(os.environ['GO']):\n    time.sleep(0.1)\n",
        )],
    );
    // The script, as a run user of its own, signals through a directory open to it.
    let signals = kiln_tests::shared_dir();
    let (started, go) = (signals.path().join("started"), signals.path().join("go"));
    let run = ana.submit_detached(&[
        "--target",
        "cpu",
        "--env",
        &format!("STARTED={}", started.display()),
        "--env",
        &format!("GO={}", go.display()),
        "--env",
        "API_KEY=hunter2",
        dir.path().to_str().unwrap(),
        "wait.py",
    ]);
    wait_for("the script to start", Duration::from_secs(30), || {
        started.exists().then_some(())
    });
    let agent_data = cluster.agent_data(agent);
    let python = agent_data.join("python");
    // What is not private on purpose: the `kiln` module containers read (public code), and
    // the unpacked snapshot, whose modes `unpack` normalises (inside the 0700 run directory).
    let runs = agent_data.join("runs");
    let snapshot_trees: Vec<std::path::PathBuf> = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .map(|entry| entry.path().join("work"))
        .collect();
    let mut except: Vec<&std::path::Path> = vec![python.as_path()];
    except.extend(snapshot_trees.iter().map(|p| p.as_path()));
    let spec_files: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .filter(|entry| entry.path().join("state/spec.json").exists())
        .collect();
    assert!(!spec_files.is_empty(), "the run has a spec.json to check");
    let mut open = open_to_others(&cluster.data_dir(), &[]);
    open.extend(open_to_others(&agent_data, &except));
    assert!(
        open.is_empty(),
        "open to others while the run runs: {open:#?}"
    );

    std::fs::write(&go, "").unwrap();
    ana.wait_status(run, "succeeded");
    let mut open = open_to_others(&cluster.data_dir(), &[]);
    open.extend(open_to_others(&agent_data, &except));
    assert!(open.is_empty(), "open to others after the run: {open:#?}");
}

#[test]
fn tokens_are_read_from_standard_input_or_a_file_as_printed() {
    let mut cluster = SecureCluster::start(&[]);
    // The join command as `token create` printed it, the token pasted on its standard input.
    let (join, token) = cluster.printed_join("cpu", &[]);
    assert!(!join.contains(&token), "{join:?}");
    let output = cluster.join_fed(0, &join, &format!("{token}\n"));
    assert!(output.status.success(), "{}", text(&output.stderr));
    // With nothing on standard input, it says so (and spends nothing).
    let (join, _) = cluster.printed_join("cpu", &[]);
    let output = cluster.join_fed(1, &join, "");
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("standard input holds no token"),
        "{}",
        text(&output.stderr)
    );
    cluster.start_agent(0);

    // `kiln login` as `user create` printed it, the token from a file instead of `-`.
    let output = cluster.admin_command(&["user", "create", "ops", "--role", "admin"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let (mut login, token) = secure::printed_command(&text(&output.stdout), &["kiln"]);
    assert_eq!(login[0], "login");
    let home = cluster.dir.path().join("home-ops");
    std::fs::create_dir_all(&home).unwrap();
    let token_file = home.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    *login.last_mut().unwrap() = token_file.display().to_string();
    let ops = secure::User { home, token };
    let login: Vec<&str> = login.iter().map(String::as_str).collect();
    let output = ops.kiln(&login);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let me = ops.kiln(&["whoami"]);
    assert!(
        text(&me.stdout).starts_with("ops (admin)"),
        "{}",
        text(&me.stdout)
    );
    cluster.wait_agent_state(&ops, &cluster.agent_id(0), "online");
    // `--token` and `--token-file` together are refused.
    let output = ops.kiln(&["login", "--token", "a.b", "--token-file", "-"]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("cannot be used with"),
        "{}",
        text(&output.stderr)
    );
}

/// Appends its name to `order` in the shared directory; `a1` then waits for `go`.
const IN_TURN: &str = r#"import os, sys, time
shared, name = sys.argv[1], sys.argv[2]
with open(os.path.join(shared, "order"), "a") as f:
    f.write(name + "\n")
while name == "a1" and not os.path.exists(os.path.join(shared, "go")):
    time.sleep(0.1)
"#;

#[test]
fn one_member_cannot_crowd_out_another() {
    let mut cluster = SecureCluster::start(&["--max-queued-per-user", "3"]);
    let agent = cluster.add_agent("cpu");
    let admin = cluster.login("root", "admin");
    let ana = cluster.login("ana", "member");
    let bo = cluster.login("bo", "member");
    cluster.wait_agent_state(&admin, &cluster.agent_id(agent), "online");
    let shared = kiln_tests::shared_dir();
    let src = kiln_tests::shared_dir();
    write_tree(src.path(), &[("turn.py", IN_TURN)]);
    let (shared_path, src_path) = (
        shared.path().to_str().unwrap(),
        src.path().to_str().unwrap(),
    );
    let submit = |user: &secure::User, name: &str| {
        user.kiln(&[
            "submit",
            "--detach",
            "--target",
            "cpu",
            src_path,
            "turn.py",
            "--",
            shared_path,
            name,
        ])
    };
    // Every run has a user of its own: the file they all append to is writable by all.
    let order_file = shared.path().join("order");
    std::fs::write(&order_file, "").unwrap();
    std::fs::set_permissions(
        &order_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let order = || std::fs::read_to_string(&order_file).unwrap_or_default();
    // ana's first run holds the agent's one slot; three more of hers wait.
    assert!(submit(&ana, "a1").status.success());
    wait_for("a1 to start", Duration::from_secs(30), || {
        (order() == "a1\n").then_some(())
    });
    for name in ["a2", "a3", "a4"] {
        let output = submit(&ana, name);
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    // A fourth queued run is over her cap, said in words; nothing is queued for it.
    let refused = submit(&ana, "a5");
    assert!(!refused.status.success());
    let message = text(&refused.stderr);
    assert!(
        message.contains("you have 3 runs queued") && message.contains("max_queued_per_user = 3"),
        "{message}"
    );
    assert_eq!(ana.json(&["runs", "--json"]).as_array().unwrap().len(), 4);
    // bo has a cap of his own, and his one run does not wait behind all of ana's.
    let output = submit(&bo, "b1");
    assert!(output.status.success(), "{}", text(&output.stderr));
    std::fs::write(shared.path().join("go"), "").unwrap();
    wait_for("every run to start", Duration::from_secs(60), || {
        (order().lines().count() == 5).then_some(())
    });
    assert_eq!(order(), "a1\nb1\na2\na3\na4\n");
}

#[test]
fn connections_that_say_nothing_cannot_crowd_out_other_users() {
    // A small per-address cap, so the test needs few descriptors: an attacker on
    // 127.0.0.2 opens ten times that many connections and sends nothing.
    let cluster = SecureCluster::start(&["--max-connections-per-ip", "50"]);
    let user = cluster.login("ana", "member");
    let target = cluster.socket_addr();
    let held: Vec<tokio::net::TcpStream> = block_on(async {
        let mut held = Vec::new();
        for _ in 0..500 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            held.push(socket.connect(target).await.expect("connect"));
        }
        // The coordinator keeps the first 50 and closes the others as it accepts them:
        // they read EOF (the 50 are closed only by the TLS handshake timeout, 10 s).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut closed = 0;
        for stream in &mut held {
            use tokio::io::AsyncReadExt as _;
            let mut byte = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(20), stream.read(&mut byte)).await
            {
                closed += 1;
            }
        }
        assert_eq!(closed, 450, "of 500 connections; all but the 50 admitted");
        held
    });
    // A real user on another address is served while the attacker holds its share.
    let started = std::time::Instant::now();
    let runs = user.kiln(&["runs"]);
    assert!(runs.status.success(), "{}", text(&runs.stderr));
    eprintln!(
        "kiln runs answered in {:?} beside 500 idle connections",
        started.elapsed()
    );
    let log = std::fs::read_to_string(cluster.dir.path().join("coordinator.log")).unwrap();
    assert!(
        log.contains("this address has max_connections_per_ip open"),
        "{log}"
    );
    drop(held);
}

#[test]
fn logins_to_two_coordinators_and_the_local_target_side_by_side() {
    let first = SecureCluster::start(&[]);
    let second = SecureCluster::start(&[]);
    let ana = first.login("ana", "member");
    // The same person logs in to a second coordinator: the first login stays stored.
    let output = second.admin_command(&["user", "create", "ana", "--role", "member"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let (words, token) = secure::printed_command(&text(&output.stdout), &["kiln"]);
    let words = secure::with_token_argument(words, &token);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let login = ana.kiln(&words);
    assert!(login.status.success(), "{}", text(&login.stderr));
    assert!(
        text(&login.stderr).contains("1 other login"),
        "{}",
        text(&login.stderr)
    );
    let whoami = |coordinator: Option<&str>| {
        let mut args = vec!["whoami"];
        if let Some(c) = coordinator {
            args.extend(["--coordinator", c]);
        }
        let output = ana.kiln(&args);
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stdout) + &text(&output.stderr)
    };
    assert!(whoami(None).contains(&second.address), "{}", whoami(None));
    assert!(whoami(Some(&first.address)).contains(&first.address));

    // `--target local` runs on this machine's local daemon while logged in to a cluster,
    // and `--coordinator local` reaches it afterwards; the cluster never sees the run.
    let dir = project();
    let output = ana.kiln(&[
        "submit",
        "--target",
        "local",
        dir.path().to_str().unwrap(),
        "hello.py",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("hello over mTLS"));
    let local_runs = ana.json(&["runs", "--json", "--coordinator", "local"]);
    assert_eq!(local_runs[0]["target"], "local", "{local_runs}");
    let cluster_runs = ana.json(&["runs", "--json"]);
    assert_eq!(
        cluster_runs.as_array().map(Vec::len),
        Some(0),
        "{cluster_runs}"
    );

    // Logging out of the one in use keeps the other.
    let logout = ana.kiln(&["logout"]);
    assert!(logout.status.success());
    assert!(whoami(Some(&first.address)).contains(&first.address));
    let pid: i32 = std::fs::read_to_string(ana.home.join("data/kiln/local/daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
}

#[test]
fn an_admin_gives_one_user_a_queue_limit_of_their_own() {
    let mut cluster = SecureCluster::start(&[]);
    let agent = cluster.add_agent("cpu");
    let admin = cluster.login("root", "admin");
    cluster.wait_agent_state(&admin, &cluster.agent_id(agent), "online");
    let ana = cluster.login("ana", "member");
    let bo = cluster.login("bo", "member");
    let limit = cluster.admin_command(&["user", "limit", "ana", "--max-queued", "1"]);
    assert!(limit.status.success(), "{}", text(&limit.stderr));
    let listed = text(&cluster.admin_command(&["user", "list"]).stdout);
    let ana_line = listed
        .lines()
        .find(|l| l.starts_with("ana "))
        .unwrap_or_default();
    assert!(ana_line.trim_end().ends_with(" 1"), "{listed}");
    let dir = project();
    let path = dir.path().to_str().unwrap();
    let marker = dir.path().join("m");
    let env = format!("MARKER={}", marker.display());
    // The one slot runs ana's first run; her second waits; a third is over her limit.
    let first = ana.submit_detached(&["--target", "cpu", "--env", &env, path, "slow.py"]);
    ana.wait_status(first, "running");
    ana.submit_detached(&["--target", "cpu", "--env", &env, path, "slow.py"]);
    let refused = ana.kiln(&[
        "submit", "--detach", "--target", "cpu", "--env", &env, path, "slow.py",
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("your own limit, 1, set by an admin"),
        "{}",
        text(&refused.stderr)
    );
    // Others keep the coordinator's limit.
    bo.submit_detached(&["--target", "cpu", "--env", &env, path, "slow.py"]);
    bo.submit_detached(&["--target", "cpu", "--env", &env, path, "slow.py"]);
    // Back to the default: she may queue more again.
    let reset = cluster.admin_command(&["user", "limit", "ana", "--max-queued", "default"]);
    assert!(reset.status.success(), "{}", text(&reset.stderr));
    ana.submit_detached(&["--target", "cpu", "--env", &env, path, "slow.py"]);
    let bad = cluster.admin_command(&["user", "limit", "ana", "--max-queued", "0"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("neither a number"),
        "{}",
        text(&bad.stderr)
    );
}
