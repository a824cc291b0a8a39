use super::*;
use kiln_common::run::Outcome;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("kiln.db")).unwrap();
    store.ensure_target("cpu", 0).unwrap();
    (dir, store)
}

fn submit(store: &Store) -> v1::Run {
    store
        .insert_run(&NewRun {
            name: "n",
            target: "cpu",
            snapshot_digest: "sha256:00",
            script: "train.py",
            args: &["--lr".into(), "0.1".into()],
            max_retries: 0,
            checkpoint_interval_s: 0,
            gang: GangSpec::default(),
            environment: None,
            resources: None,
            env: &HashMap::new(),
            secret_names: &[],
            sealed_secrets: None,
            timeout_s: 0,
            owner: "ana",
            now_ms: 1,
        })
        .unwrap()
}

#[test]
fn a_blob_is_readable_by_its_uploaders_and_through_the_runs_that_name_it() {
    let (_dir, mut store) = store();
    store.ensure_target("cpu", 0).unwrap();
    let (ana, bo) = (BlobReader::User("ana"), BlobReader::User("bo"));
    let (ag1, ag2) = (BlobReader::Agent("ag-1"), BlobReader::Agent("ag-2"));
    let readable =
        |store: &Store, digest: &str, reader| store.blob_readable(digest, reader).unwrap();
    // The uploader, and nobody else.
    store.add_blob_owner("sha256:up", bo, 1).unwrap();
    store.add_blob_owner("sha256:up", bo, 2).unwrap();
    assert!(readable(&store, "sha256:up", bo));
    assert!(!readable(&store, "sha256:up", ana));
    assert!(!readable(&store, "sha256:up", BlobReader::Agent("bo")));
    // A run's snapshot: its owner, and the agent holding it while it is placed.
    let run = submit(&store);
    assert!(readable(&store, "sha256:00", ana));
    assert!(!readable(&store, "sha256:00", bo));
    assert!(!readable(&store, "sha256:00", ag1), "not placed yet");
    let placed = EventFields {
        placement: &["ag-1".to_string()],
        now_ms: 2,
        ..Default::default()
    };
    store
        .transition(run.id, None, RunEvent::Assign, &placed)
        .unwrap();
    store.set_checkpoint(run.id, 1, 0, "sha256:ck").unwrap();
    for digest in ["sha256:00", "sha256:ck"] {
        assert!(readable(&store, digest, ag1), "{digest}");
        assert!(!readable(&store, digest, ag2), "{digest}");
        assert!(readable(&store, digest, ana), "{digest}");
        assert!(!readable(&store, digest, bo), "{digest}");
    }
    // Outputs, the run's and a node's: its owner; the agent only what it uploaded.
    store
        .node_exited(run.id, 1, 0, Some(0), "sha256:node-out")
        .unwrap();
    let done = EventFields {
        exit_code: Some(0),
        outputs_digest: Some("sha256:out"),
        now_ms: 3,
        ..Default::default()
    };
    store
        .transition(run.id, Some(1), RunEvent::Start, &done)
        .unwrap();
    store
        .transition(run.id, Some(1), RunEvent::Finish(Outcome::Succeeded), &done)
        .unwrap();
    for digest in ["sha256:out", "sha256:node-out", "sha256:00", "sha256:ck"] {
        assert!(readable(&store, digest, ana), "{digest}");
        assert!(!readable(&store, digest, bo), "{digest}");
        assert!(!readable(&store, digest, ag1), "{digest}: the run ended");
    }
}

#[test]
fn a_run_moves_through_its_life_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let run_id = {
        let mut store = Store::open(&path).unwrap();
        store.ensure_target("cpu", 0).unwrap();
        let run = submit(&store);
        assert_eq!(run.args, vec!["--lr", "0.1"]);
        let fields = EventFields {
            placement: &["ag-1".to_string()],
            now_ms: 2,
            ..Default::default()
        };
        let run = store
            .transition(run.id, None, RunEvent::Assign, &fields)
            .unwrap();
        assert_eq!((run.attempt, run.agent_id.as_str()), (1, "ag-1"));
        // A stale attempt is fenced off.
        assert!(
            store
                .transition(run.id, Some(0), RunEvent::Start, &fields)
                .is_err()
        );
        store
            .transition(run.id, Some(1), RunEvent::Start, &fields)
            .unwrap();
        let done = EventFields {
            exit_code: Some(3),
            now_ms: 5,
            ..Default::default()
        };
        store
            .transition(run.id, Some(1), RunEvent::Finish(Outcome::Failed), &done)
            .unwrap();
        run.id
    };
    let store = Store::open(&path).unwrap();
    let run = store.get_run(run_id).unwrap().unwrap();
    assert_eq!(run.status(), v1::RunStatus::Failed);
    assert_eq!(run.exit_code, Some(3));
    assert_eq!(
        (run.started_unix_ms, run.finished_unix_ms),
        (Some(2), Some(5))
    );
}

#[test]
fn a_gang_holds_a_slot_on_every_node_and_each_node_has_its_own_log_sequence() {
    let (_dir, mut store) = store();
    let run = store
        .insert_run(&NewRun {
            name: "ddp",
            target: "cpu",
            snapshot_digest: "sha256:00",
            script: "train.py",
            args: &[],
            max_retries: 0,
            checkpoint_interval_s: 0,
            gang: GangSpec {
                nodes: 2,
                procs_per_node: 4,
                max_restarts: 1,
                ..GangSpec::default()
            },
            environment: None,
            resources: None,
            env: &HashMap::new(),
            secret_names: &[],
            sealed_secrets: None,
            timeout_s: 0,
            owner: "",
            now_ms: 1,
        })
        .unwrap();
    assert!(is_gang(&run));
    let placement = ["ag-a".to_string(), "ag-b".to_string()];
    let fields = EventFields {
        placement: &placement,
        now_ms: 2,
        ..Default::default()
    };
    let run = store
        .transition(run.id, None, RunEvent::Assign, &fields)
        .unwrap();
    assert_eq!(
        run.placement
            .iter()
            .map(|n| (n.node_rank, n.agent_id.as_str()))
            .collect::<Vec<_>>(),
        [(0, "ag-a"), (1, "ag-b")]
    );
    let per_agent = store.active_runs_per_agent().unwrap();
    assert_eq!((per_agent["ag-a"], per_agent["ag-b"]), (1, 1));
    assert_eq!(store.active_runs_of_agent("ag-b").unwrap().len(), 1);
    assert_eq!(store.node_of(run.id, 1, "ag-b").unwrap(), Some(1));
    assert_eq!(store.node_of(run.id, 1, "ag-c").unwrap(), None);
    // Both nodes number their lines from 1; neither hides the other's.
    let line = |seq: u64, rank: u32| v1::LogLine {
        seq,
        rank: Some(rank),
        text: format!("rank {rank} line {seq}"),
        ..Default::default()
    };
    assert_eq!(
        store
            .append_logs(run.id, 1, 0, &[line(1, 0), line(2, 1)])
            .unwrap(),
        2
    );
    assert_eq!(store.append_logs(run.id, 1, 1, &[line(1, 4)]).unwrap(), 1);
    assert_eq!(store.read_logs(run.id, 0, 100, None).unwrap().len(), 3);
    let rank4 = store.read_logs(run.id, 0, 100, Some(4)).unwrap();
    assert_eq!(rank4.len(), 1);
    assert_eq!(
        (rank4[0].text.as_str(), rank4[0].node),
        ("rank 4 line 1", 1)
    );
    // A restart frees both nodes and counts the restart.
    store
        .transition(run.id, Some(1), RunEvent::Start, &fields)
        .unwrap();
    let run = store
        .transition(run.id, Some(1), RunEvent::Retry, &fields)
        .unwrap();
    assert_eq!((run.status(), run.restarts), (v1::RunStatus::Queued, 1));
    assert!(store.active_runs_per_agent().unwrap().is_empty());
}

#[test]
fn a_stopping_gang_holds_its_nodes_until_it_settles_and_keeps_each_nodes_results() {
    let (_dir, mut store) = store();
    let run = store
        .insert_run(&NewRun {
            name: "ddp",
            target: "cpu",
            snapshot_digest: "sha256:00",
            script: "train.py",
            args: &[],
            max_retries: 0,
            checkpoint_interval_s: 1,
            gang: GangSpec {
                nodes: 2,
                max_restarts: 1,
                ..GangSpec::default()
            },
            environment: None,
            resources: None,
            env: &HashMap::new(),
            secret_names: &[],
            sealed_secrets: None,
            timeout_s: 0,
            owner: "",
            now_ms: 1,
        })
        .unwrap();
    let placement = ["ag-a".to_string(), "ag-b".to_string()];
    let fields = EventFields {
        placement: &placement,
        now_ms: 2,
        ..Default::default()
    };
    store
        .transition(run.id, None, RunEvent::Assign, &fields)
        .unwrap();
    store
        .transition(run.id, Some(1), RunEvent::Start, &fields)
        .unwrap();
    // Each node's checkpoint is kept for its own rank.
    store.set_checkpoint(run.id, 1, 0, "sha256:c0").unwrap();
    store.set_checkpoint(run.id, 1, 1, "sha256:c1").unwrap();
    let checkpoints = store.node_checkpoints(run.id).unwrap();
    assert_eq!(
        (checkpoints[&0].as_str(), checkpoints[&1].as_str()),
        ("sha256:c0", "sha256:c1")
    );
    // Node 1 fails: the run stops, still holding both agents, until node 0 reports.
    store
        .node_exited(run.id, 1, 1, Some(3), "sha256:o1")
        .unwrap();
    let stop = EventFields {
        pending: Some(run::Pending::Retry),
        message: Some("rank 1 failed"),
        now_ms: 3,
        ..Default::default()
    };
    let run = store
        .transition(run.id, Some(1), RunEvent::Stop, &stop)
        .unwrap();
    assert_eq!(run.status(), v1::RunStatus::Stopping);
    assert_eq!(store.pending(run.id).unwrap(), Some(run::Pending::Retry));
    assert_eq!(store.active_runs_per_agent().unwrap().len(), 2);
    store
        .node_exited(run.id, 1, 0, Some(143), "sha256:o0")
        .unwrap();
    let run = store
        .transition(
            run.id,
            Some(1),
            RunEvent::Settle(run::Pending::Retry),
            &stop,
        )
        .unwrap();
    assert_eq!((run.status(), run.restarts), (v1::RunStatus::Queued, 1));
    assert_eq!(store.pending(run.id).unwrap(), None);
    assert!(store.active_runs_per_agent().unwrap().is_empty());
    // The next attempt fails for good: the run keeps every node's outputs.
    store
        .transition(run.id, None, RunEvent::Assign, &fields)
        .unwrap();
    store
        .node_exited(run.id, 2, 0, Some(0), "sha256:p0")
        .unwrap();
    store.node_exited(run.id, 2, 1, Some(1), "").unwrap();
    let stop = EventFields {
        pending: Some(run::Pending::Failed),
        now_ms: 4,
        ..Default::default()
    };
    store
        .transition(run.id, Some(2), RunEvent::Stop, &stop)
        .unwrap();
    let run = store
        .transition(
            run.id,
            Some(2),
            RunEvent::Settle(run::Pending::Failed),
            &stop,
        )
        .unwrap();
    assert_eq!(run.status(), v1::RunStatus::Failed);
    assert_eq!(run.node_outputs_digests, ["sha256:p0", ""]);
}

#[test]
fn processes_opening_a_new_database_at_once_migrate_it_once() {
    // The packaged service and `kiln-coordinator user create` may open a
    // database that does not exist yet at the same moment.
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let opened = {
            let path = path.clone();
            crate::at_once(4, move || {
                Store::open(&path).map(|_| ()).map_err(|e| format!("{e:#}"))
            })
        };
        for result in opened {
            result.unwrap();
        }
        let store = Store::open(&path).unwrap();
        let version: usize = store
            .conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
    }
}

#[test]
fn a_database_from_before_gangs_keeps_its_placed_runs_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    {
        // The schema as the previous release left it, with one running run.
        let conn = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..4] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 4).unwrap();
        conn.execute_batch(
            "INSERT INTO targets VALUES ('cpu', 0);
                 INSERT INTO runs (name, target, status, agent_id, attempt, snapshot_digest,
                    script, args, created_ms)
                 VALUES ('old', 'cpu', 'running', 'ag-1', 1, 'sha256:00', 'a.py', '[]', 0);
                 INSERT INTO logs (run_id, attempt, seq, stream, time_ms, text)
                 VALUES (1, 1, 1, 1, 0, 'before the upgrade');",
        )
        .unwrap();
    }
    let mut store = Store::open(&path).unwrap();
    assert_eq!(store.node_of(1, 1, "ag-1").unwrap(), Some(0));
    assert_eq!(store.active_runs_of_agent("ag-1").unwrap().len(), 1);
    let line = v1::LogLine {
        seq: 2,
        text: "after".into(),
        ..Default::default()
    };
    assert_eq!(store.append_logs(1, 1, 0, &[line]).unwrap(), 2);
    let texts: Vec<_> = store
        .read_logs(1, 0, 10, None)
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(texts, ["before the upgrade", "after"]);
}

#[test]
fn repeated_log_lines_are_stored_once() {
    let (_dir, mut store) = store();
    let run = submit(&store);
    let line = |seq: u64| v1::LogLine {
        seq,
        text: format!("line {seq}"),
        ..Default::default()
    };
    assert_eq!(
        store
            .append_logs(run.id, 1, 0, &[line(1), line(2)])
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .append_logs(run.id, 1, 0, &[line(2), line(3)])
            .unwrap(),
        3
    );
    let texts: Vec<_> = store
        .read_logs(run.id, 0, 100, None)
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(texts, ["line 1", "line 2", "line 3"]);
}

#[test]
fn a_batch_after_a_gap_is_refused_until_the_gap_is_filled() {
    let (_dir, mut store) = store();
    let run = submit(&store);
    let line = |seq: u64| v1::LogLine {
        seq,
        text: format!("line {seq}"),
        ..Default::default()
    };
    assert_eq!(
        store
            .append_logs(run.id, 1, 0, &[line(1), line(2)])
            .unwrap(),
        2
    );
    // Lines 3-4 were lost with a connection; 5-6 arrive first and are refused.
    assert_eq!(
        store
            .append_logs(run.id, 1, 0, &[line(5), line(6)])
            .unwrap(),
        2
    );
    // The agent resends from 3 (with 2 again, already stored): all is stored in order.
    let resent: Vec<_> = (2..=6).map(line).collect();
    assert_eq!(store.append_logs(run.id, 1, 0, &resent).unwrap(), 6);
    let texts: Vec<_> = store
        .read_logs(run.id, 0, 100, None)
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(
        texts,
        (1..=6).map(|i| format!("line {i}")).collect::<Vec<_>>()
    );
}

#[test]
fn metric_summary_keeps_the_last_point() {
    let (_dir, mut store) = store();
    let run = submit(&store);
    let point = |seq: u64, name: &str, value: f64| v1::MetricPoint {
        seq,
        name: name.into(),
        value,
        step: Some(seq as i64),
        time_unix_ms: 0,
        rank: None,
        cursor: 0,
    };
    store
        .append_metrics(
            run.id,
            1,
            0,
            &[
                point(1, "loss", 0.9),
                point(2, "acc", 0.5),
                point(3, "loss", 0.4),
            ],
        )
        .unwrap();
    let summaries = store.metric_summaries(run.id, None).unwrap();
    assert_eq!(summaries.len(), 2);
    assert_eq!(summaries[1].name, "loss");
    assert_eq!(
        (
            summaries[1].last_value,
            summaries[1].last_step,
            summaries[1].count
        ),
        (0.4, Some(3), 2)
    );
}

#[cfg(test)]
mod page_tests {
    use super::*;

    fn store_with_runs(n_runs: usize) -> (tempfile::TempDir, Store, Vec<i64>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kiln.db")).unwrap();
        store.ensure_target("cpu", 0).unwrap();
        let ids = (0..n_runs)
            .map(|i| {
                store
                    .insert_run(&NewRun {
                        name: &format!("run-{i}"),
                        target: "cpu",
                        snapshot_digest: "sha256:00",
                        script: "train.py",
                        args: &[],
                        max_retries: 0,
                        checkpoint_interval_s: 0,
                        gang: GangSpec::default(),
                        environment: None,
                        resources: None,
                        env: &HashMap::new(),
                        secret_names: &[],
                        sealed_secrets: None,
                        timeout_s: 0,
                        owner: "ana",
                        now_ms: 1,
                    })
                    .unwrap()
                    .id
            })
            .collect();
        (dir, store, ids)
    }

    #[test]
    fn runs_come_in_byte_capped_pages_each_once_newest_first() {
        let (_dir, store, ids) = store_with_runs(10);
        let run_bytes = page::element_len(&store.get_run(ids[0]).unwrap().unwrap());
        let mut before = None;
        let mut seen = Vec::new();
        let mut n_pages = 0;
        loop {
            let page = store
                .list_runs(None, None, before, 3 * run_bytes, 100)
                .unwrap();
            assert!(page.items.len() <= 3, "{} runs in a page", page.items.len());
            seen.extend(page.items.iter().map(|run| run.id));
            n_pages += 1;
            if !page.more {
                break;
            }
            before = page.items.last().map(|run| run.id);
        }
        let newest_first: Vec<i64> = ids.iter().rev().copied().collect();
        assert_eq!((seen, n_pages), (newest_first, 4));
        // The run limit ends a page too, and says that more follow.
        let page = store.list_runs(None, None, None, usize::MAX, 4).unwrap();
        assert_eq!((page.items.len(), page.more), (4, true));
        // A page smaller than one run still holds one.
        let page = store.list_runs(None, None, None, 1, 100).unwrap();
        assert_eq!((page.items.len(), page.more), (1, true));
    }

    #[test]
    fn log_lines_come_in_byte_capped_pages_in_order() {
        let (_dir, mut store, ids) = store_with_runs(1);
        let lines: Vec<v1::LogLine> = (1..=10)
            .map(|seq| v1::LogLine {
                seq,
                text: format!("{seq:04} {}", "x".repeat(995)),
                ..Default::default()
            })
            .collect();
        assert_eq!(store.append_logs(ids[0], 1, 0, &lines).unwrap(), 10);
        let mut cursor = 0;
        let mut texts = Vec::new();
        let mut n_pages = 0;
        loop {
            // Three 1000-byte lines and their fields fit; four do not.
            let page = store
                .read_logs_page(ids[0], cursor, None, 3500, 2000)
                .unwrap();
            assert!(page.items.len() <= 3);
            texts.extend(page.items.iter().map(|line| line.text.clone()));
            n_pages += 1;
            cursor = page.items.last().map_or(cursor, |line| line.cursor);
            if !page.more {
                break;
            }
        }
        let expected: Vec<String> = lines.into_iter().map(|line| line.text).collect();
        assert_eq!((texts, n_pages), (expected, 4));
        let page = store
            .read_logs_page(ids[0], 0, None, usize::MAX, 2)
            .unwrap();
        assert_eq!((page.items.len(), page.more), (2, true));
    }

    #[test]
    fn a_metrics_points_come_in_byte_capped_pages_oldest_first() {
        let (_dir, mut store, ids) = store_with_runs(1);
        let run_id = ids[0];
        let points: Vec<v1::MetricPoint> = (1..=500u64)
            .map(|seq| v1::MetricPoint {
                seq,
                name: if seq % 2 == 0 { "loss" } else { "acc" }.into(),
                value: seq as f64,
                step: Some(seq as i64),
                time_unix_ms: 1_000 + seq as i64,
                ..Default::default()
            })
            .collect();
        store.append_metrics(run_id, 1, 0, &points).unwrap();
        let (mut after, mut pages, mut values) = (0, 0, Vec::new());
        loop {
            let page = store
                .metric_points_page(run_id, "loss", None, after, 1024)
                .unwrap();
            pages += 1;
            assert!(!page.items.is_empty());
            after = page.items.last().unwrap().cursor;
            values.extend(page.items.iter().map(|p| (p.name.clone(), p.value, p.step)));
            if !page.more {
                break;
            }
        }
        assert!(pages > 1, "1 KiB pages of 250 points");
        let expected: Vec<_> = (1..=250)
            .map(|i| ("loss".to_string(), (2 * i) as f64, Some(2 * i as i64)))
            .collect();
        assert_eq!(values, expected);
        assert!(
            store
                .metric_points_page(run_id, "missing", None, 0, 1024)
                .unwrap()
                .items
                .is_empty()
        );
    }

    #[test]
    fn metric_summaries_come_in_byte_capped_pages_by_name() {
        let (_dir, mut store, ids) = store_with_runs(1);
        let points: Vec<v1::MetricPoint> = (1..=7)
            .map(|seq| v1::MetricPoint {
                seq,
                name: format!("metric-{seq}"),
                value: seq as f64,
                ..Default::default()
            })
            .collect();
        store.append_metrics(ids[0], 1, 0, &points).unwrap();
        let mut after: Option<String> = None;
        let mut names = Vec::new();
        let mut n_pages = 0;
        loop {
            // A summary here takes 24 bytes: two fit in 50.
            let page = store
                .metric_summaries_page(ids[0], None, after.as_deref(), 50)
                .unwrap();
            assert!(page.items.len() <= 2);
            names.extend(page.items.iter().map(|m| m.name.clone()));
            n_pages += 1;
            if !page.more {
                break;
            }
            after = page.items.last().map(|m| m.name.clone());
        }
        let expected: Vec<String> = (1..=7).map(|i| format!("metric-{i}")).collect();
        assert_eq!((names, n_pages), (expected, 4));
    }
}

#[test]
fn a_runs_sealed_secrets_are_kept_until_it_ends_and_only_their_names_are_shown() {
    let (_dir, mut store) = {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kiln.db")).unwrap();
        store.ensure_target("cpu", 0).unwrap();
        (dir, store)
    };
    let names = ["HF_TOKEN".to_string()];
    let run = store
        .insert_run(&NewRun {
            name: "r",
            target: "cpu",
            snapshot_digest: "sha256:x",
            script: "t.py",
            args: &[],
            max_retries: 0,
            checkpoint_interval_s: 0,
            gang: GangSpec::default(),
            environment: None,
            resources: None,
            env: &HashMap::new(),
            secret_names: &names,
            sealed_secrets: Some(b"sealed bytes"),
            timeout_s: 0,
            owner: "",
            now_ms: 1,
        })
        .unwrap();
    assert_eq!(run.secret_names, names);
    assert_eq!(
        store.sealed_secrets(run.id).unwrap().as_deref(),
        Some(&b"sealed bytes"[..])
    );
    let ended = store
        .transition(run.id, None, RunEvent::Cancel, &EventFields::default())
        .unwrap();
    assert_eq!(ended.status(), v1::RunStatus::Cancelled);
    assert_eq!(store.sealed_secrets(run.id).unwrap(), None);
    assert_eq!(ended.secret_names, names);
}

#[test]
fn pruning_removes_an_old_runs_logs_metrics_and_blob_references_and_keeps_its_record() {
    let (_dir, mut store) = store();
    let run_through = |store: &mut Store, ended_ms: i64| {
        let run = submit(store);
        let placed = EventFields {
            placement: &["ag-1".to_string()],
            now_ms: 2,
            ..Default::default()
        };
        store
            .transition(run.id, None, RunEvent::Assign, &placed)
            .unwrap();
        store.set_checkpoint(run.id, 1, 0, "sha256:ck").unwrap();
        store
            .node_exited(run.id, 1, 0, Some(0), &format!("sha256:node-out{}", run.id))
            .unwrap();
        let done = EventFields {
            exit_code: Some(0),
            outputs_digest: Some(&format!("sha256:out{}", run.id)),
            now_ms: ended_ms,
            ..Default::default()
        };
        store
            .transition(run.id, Some(1), RunEvent::Start, &done)
            .unwrap();
        let line = v1::LogLine {
            seq: 1,
            text: "hello".into(),
            ..Default::default()
        };
        store.append_logs(run.id, 1, 0, &[line]).unwrap();
        store
            .transition(run.id, Some(1), RunEvent::Finish(Outcome::Succeeded), &done)
            .unwrap();
        run.id
    };
    let old = run_through(&mut store, 1_000);
    let recent = run_through(&mut store, 5_000);
    let queued = submit(&store);
    let kept = store.referenced_digests().unwrap();
    for digest in [
        "sha256:00",
        "sha256:ck",
        &format!("sha256:out{old}"),
        &format!("sha256:node-out{old}"),
    ] {
        assert!(kept.contains(digest), "{digest} in {kept:?}");
    }
    // Runs that ended before 3,000 go; the recent one and the queued one stay.
    assert_eq!(store.prune_runs(3_000, 9_000).unwrap(), [old]);
    assert_eq!(store.prune_runs(3_000, 9_500).unwrap(), Vec::<i64>::new());
    let pruned = store.get_run(old).unwrap().unwrap();
    assert_eq!(pruned.pruned_unix_ms, Some(9_000));
    assert_eq!(pruned.status(), v1::RunStatus::Succeeded);
    assert_eq!(pruned.outputs_digest, "");
    assert!(store.read_logs(old, 0, 100, None).unwrap().is_empty());
    assert_eq!(store.read_logs(recent, 0, 100, None).unwrap().len(), 1);
    let kept = store.referenced_digests().unwrap();
    assert!(!kept.contains(&format!("sha256:out{old}")));
    assert!(!kept.contains(&format!("sha256:node-out{old}")));
    assert!(kept.contains(&format!("sha256:out{recent}")));
    // Still named by the recent and the queued run.
    assert!(kept.contains("sha256:00") && kept.contains("sha256:ck"));
    assert_eq!(
        store.get_run(queued.id).unwrap().unwrap().pruned_unix_ms,
        None
    );
}
