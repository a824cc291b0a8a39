//! Whole lists from the coordinator's byte-capped pages. Each function asks for the next
//! page with the previous reply's token until the list ends, so `kiln runs`, `kiln metrics`
//! and `kiln agents` (tables and `--json`) show everything, however large, while no single
//! reply comes near the message size limit. A coordinator from before paging sends no token:
//! its one reply is the whole list.

use kiln_proto::v1::{self, kiln_client::KilnClient};

use crate::status_error;

type Client = KilnClient<kiln_proto::AuthChannel>;

/// The page size to ask for: 0 (the coordinator's own) unless `KILN_PAGE_BYTES` asks for
/// smaller pages. Not a documented setting: tests set it to make short lists span pages.
pub fn page_bytes() -> u32 {
    std::env::var("KILN_PAGE_BYTES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// The newest `limit` runs (every run when `limit` is 0), of `target` when not empty.
pub async fn runs(client: &mut Client, target: &str, limit: u32) -> anyhow::Result<Vec<v1::Run>> {
    let limit = if limit == 0 { u32::MAX } else { limit };
    let mut runs: Vec<v1::Run> = Vec::new();
    let mut page_token = String::new();
    while (runs.len() as u32) < limit {
        let reply = client
            .list_runs(v1::ListRunsRequest {
                target: target.to_string(),
                limit: limit - runs.len() as u32,
                page_token,
                max_page_bytes: page_bytes(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let empty = reply.runs.is_empty();
        runs.extend(reply.runs);
        if reply.next_page_token.is_empty() || empty {
            break;
        }
        page_token = reply.next_page_token;
    }
    Ok(runs)
}

/// Every item of a paged list: `page(token)` fetches one page (the items and the next
/// token, empty at the end), starting with an empty token.
async fn all_pages<T, Page>(mut page: impl FnMut(String) -> Page) -> anyhow::Result<Vec<T>>
where
    Page: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut items = Vec::new();
    let mut page_token = String::new();
    loop {
        let (more, next) = page(page_token).await.map_err(status_error)?;
        let empty = more.is_empty();
        items.extend(more);
        if next.is_empty() || empty {
            return Ok(items);
        }
        page_token = next;
    }
}

/// Every metric of a run (of `rank`, for a distributed run), in name order.
pub async fn metrics(
    client: &mut Client,
    run_id: i64,
    rank: Option<u32>,
) -> anyhow::Result<Vec<v1::MetricSummary>> {
    all_pages(|page_token| {
        let mut client = client.clone();
        async move {
            let reply = client
                .list_metrics(v1::ListMetricsRequest {
                    run_id,
                    rank,
                    page_token,
                    max_page_bytes: page_bytes(),
                })
                .await?
                .into_inner();
            Ok((reply.metrics, reply.next_page_token))
        }
    })
    .await
}

/// Every point of metric `name` of a run (of `rank`, for a distributed run), oldest first.
pub async fn metric_series(
    client: &mut Client,
    run_id: i64,
    name: &str,
    rank: Option<u32>,
) -> anyhow::Result<Vec<v1::MetricPoint>> {
    all_pages(|page_token| {
        let (mut client, name) = (client.clone(), name.to_string());
        async move {
            let reply = client
                .get_metric_series(v1::GetMetricSeriesRequest {
                    run_id,
                    name,
                    rank,
                    page_token,
                    max_page_bytes: page_bytes(),
                })
                .await?
                .into_inner();
            Ok((reply.points, reply.next_page_token))
        }
    })
    .await
}

/// Every agent, by target and id.
pub async fn agents(client: &mut Client) -> anyhow::Result<Vec<v1::Agent>> {
    all_pages(|page_token| {
        let mut client = client.clone();
        async move {
            let reply = client
                .list_agents(v1::ListAgentsRequest {
                    page_token,
                    max_page_bytes: page_bytes(),
                })
                .await?
                .into_inner();
            Ok((reply.agents, reply.next_page_token))
        }
    })
    .await
}
