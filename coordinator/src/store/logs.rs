//! Log lines and metric points: idempotent on (run, attempt, node, seq), paged reads.

use super::*;

impl Store {
    // ---- logs and metrics ----

    /// Stores log lines in sequence order. Lines already stored are ignored; a batch that does
    /// not continue the stored sequence (a gap: an earlier batch was lost with a connection)
    /// is not stored at all, so an attempt's stored lines are always 1..=N with no hole and
    /// in cursor order. Returns N, the highest sequence number stored for the attempt: the
    /// agent resends everything after it.
    pub fn append_logs(
        &mut self,
        run_id: i64,
        attempt: u32,
        node: u32,
        lines: &[v1::LogLine],
    ) -> anyhow::Result<u64> {
        let tx = self.conn.transaction()?;
        let stored = max_seq(&tx, "logs", run_id, attempt, node)?;
        let Some(lines) = continuing(lines, stored, |l| l.seq) else {
            return Ok(stored);
        };
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO logs (run_id, attempt, node, seq, stream, time_ms, text, rank)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for line in lines {
                stmt.execute(params![
                    run_id,
                    attempt,
                    node,
                    line.seq as i64,
                    line.stream,
                    line.time_unix_ms,
                    line.text,
                    line.rank
                ])?;
            }
        }
        let max = max_seq(&tx, "logs", run_id, attempt, node)?;
        tx.commit()?;
        Ok(max)
    }

    /// Lines after `after_cursor`, in cursor order; with `rank`, only that rank's lines.
    pub fn read_logs(
        &self,
        run_id: i64,
        after_cursor: i64,
        limit: u32,
        rank: Option<u32>,
    ) -> anyhow::Result<Vec<v1::LogLine>> {
        let page = self.read_logs_page(run_id, after_cursor, rank, usize::MAX, limit as usize)?;
        Ok(page.items)
    }

    /// Like [`Store::read_logs`], one page of at most `max_bytes` and `max_lines`, read
    /// lazily.
    pub fn read_logs_page(
        &self,
        run_id: i64,
        after_cursor: i64,
        rank: Option<u32>,
        max_bytes: usize,
        max_lines: usize,
    ) -> anyhow::Result<Page<v1::LogLine>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT cursor, attempt, seq, stream, time_ms, text, rank, node FROM logs
             WHERE run_id = ?1 AND cursor > ?2 AND (?3 IS NULL OR rank = ?3)
             ORDER BY cursor",
        )?;
        let lines = stmt.query_map(params![run_id, after_cursor, rank], |row| {
            Ok(v1::LogLine {
                cursor: row.get(0)?,
                attempt: row.get(1)?,
                seq: row.get::<_, i64>(2)? as u64,
                stream: row.get(3)?,
                time_unix_ms: row.get(4)?,
                text: row.get(5)?,
                rank: row.get(6)?,
                node: row.get(7)?,
            })
        })?;
        Ok(page::fill(lines, max_bytes, max_lines)?)
    }

    /// Stores metric points with the same sequence rules as [`Store::append_logs`].
    pub fn append_metrics(
        &mut self,
        run_id: i64,
        attempt: u32,
        node: u32,
        points: &[v1::MetricPoint],
    ) -> anyhow::Result<u64> {
        let tx = self.conn.transaction()?;
        let stored = max_seq(&tx, "metrics", run_id, attempt, node)?;
        let Some(points) = continuing(points, stored, |p| p.seq) else {
            return Ok(stored);
        };
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO metrics (run_id, attempt, node, seq, name, value, step, time_ms, rank)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for point in points {
                stmt.execute(params![
                    run_id,
                    attempt,
                    node,
                    point.seq as i64,
                    point.name,
                    point.value,
                    point.step,
                    point.time_unix_ms,
                    point.rank
                ])?;
            }
        }
        let max = max_seq(&tx, "metrics", run_id, attempt, node)?;
        tx.commit()?;
        Ok(max)
    }

    /// One row per metric name: the last value and step (by arrival), and the point count.
    /// With `rank`, only the points that rank reported.
    pub fn metric_summaries(
        &self,
        run_id: i64,
        rank: Option<u32>,
    ) -> anyhow::Result<Vec<v1::MetricSummary>> {
        let page = self.metric_summaries_page(run_id, rank, None, usize::MAX)?;
        Ok(page.items)
    }

    /// Like [`Store::metric_summaries`], one page of at most `max_bytes`, of the names after
    /// `after_name` when given.
    pub fn metric_summaries_page(
        &self,
        run_id: i64,
        rank: Option<u32>,
        after_name: Option<&str>,
        max_bytes: usize,
    ) -> anyhow::Result<Page<v1::MetricSummary>> {
        // SQLite takes the bare columns of an aggregate query from the row that gave max().
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, value, step, max(id), count(*) FROM metrics
             WHERE run_id = ?1 AND (?2 IS NULL OR rank = ?2) AND (?3 IS NULL OR name > ?3)
             GROUP BY name ORDER BY name",
        )?;
        let summaries = stmt.query_map(params![run_id, rank, after_name], |row| {
            Ok(v1::MetricSummary {
                name: row.get(0)?,
                last_value: row.get(1)?,
                last_step: row.get(2)?,
                count: row.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(page::fill(summaries, max_bytes, usize::MAX)?)
    }

    /// One page of the points of metric `name` (of `rank`, when given) after store position
    /// `after_id`, oldest first, at most `max_bytes`.
    pub fn metric_points_page(
        &self,
        run_id: i64,
        name: &str,
        rank: Option<u32>,
        after_id: i64,
        max_bytes: usize,
    ) -> anyhow::Result<Page<v1::MetricPoint>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, seq, value, step, time_ms, rank FROM metrics
             WHERE run_id = ?1 AND name = ?2 AND (?3 IS NULL OR rank = ?3) AND id > ?4
             ORDER BY id",
        )?;
        let points = stmt.query_map(params![run_id, name, rank, after_id], |row| {
            Ok(v1::MetricPoint {
                cursor: row.get(0)?,
                seq: row.get::<_, i64>(1)? as u64,
                name: name.to_string(),
                value: row.get(2)?,
                step: row.get(3)?,
                time_unix_ms: row.get(4)?,
                rank: row.get(5)?,
            })
        })?;
        Ok(page::fill(points, max_bytes, usize::MAX)?)
    }
}

/// The highest sequence number stored in `table` ("logs" or "metrics") for a node of an
/// attempt.
fn max_seq(
    tx: &rusqlite::Transaction,
    table: &str,
    run_id: i64,
    attempt: u32,
    node: u32,
) -> anyhow::Result<u64> {
    let sql =
        format!("SELECT max(seq) FROM {table} WHERE run_id = ?1 AND attempt = ?2 AND node = ?3");
    let max: Option<i64> = tx.query_row(&sql, params![run_id, attempt, node], |row| row.get(0))?;
    Ok(max.unwrap_or(0) as u64)
}

/// The part of a batch (in sequence order) that continues a stored sequence ending at
/// `stored`: items already stored are skipped; `None` if the rest does not start at
/// `stored + 1` or is not contiguous (storing it would leave a hole).
fn continuing<T>(items: &[T], stored: u64, seq: impl Fn(&T) -> u64) -> Option<&[T]> {
    let start = items.iter().position(|item| seq(item) > stored)?;
    let rest = &items[start..];
    let contiguous = rest
        .iter()
        .enumerate()
        .all(|(i, item)| seq(item) == stored + 1 + i as u64);
    contiguous.then_some(rest)
}
