//! One Redis connection type for a single server and for a Redis Cluster.
//!
//! Every Lua script Sluice runs touches keys of one hash tag (see [`sluice_core::keys`]), so scripts run
//! unchanged on a cluster. Pipelines are another matter: the cluster client refuses a pipeline whose
//! commands live in different slots, and Sluice's pipelines are batching, not transactions (none is
//! `MULTI`). On a cluster [`RedisConn`] therefore sends a pipeline's commands as separate requests
//! (a few dozen in flight at once, each to its slot's node) and hands back the replies in the
//! pipeline's order; a command that fails fails the whole call.

use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// How many commands of a split pipeline are in flight at once on a cluster.
const CLUSTER_PIPELINE_FANOUT: usize = 32;

const RETRIES: u32 = 6;

/// A multiplexed, auto-reconnecting Redis connection, cheap to clone.
#[derive(Clone)]
pub enum RedisConn {
    /// One server (or a proxy in front of several).
    Single(ConnectionManager),
    /// A Redis Cluster, found from its seed nodes.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects to one server at `url`. Every command (scripts included) fails after
    /// `response_timeout` without a reply, so a stalled server cannot wedge a caller.
    pub async fn single(
        url: &str,
        connection_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(connection_timeout))
            .set_number_of_retries(RETRIES as usize);
        Ok(Self::Single(
            ConnectionManager::new_with_config(client, config).await?,
        ))
    }

    /// Connects to the cluster that `seeds` (node URLs) belong to.
    pub async fn cluster(
        seeds: &[&str],
        connection_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Self> {
        let client = ClusterClient::builder(seeds.iter().copied())
            .response_timeout(response_timeout)
            .connection_timeout(connection_timeout)
            .retries(RETRIES)
            .build()?;
        Ok(Self::Cluster(client.get_async_connection().await?))
    }

    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => {
                if pipeline.is_transaction() {
                    return c.req_packed_commands(pipeline, offset, count);
                }
                let conn = c.clone();
                Box::pin(split_pipeline(conn, pipeline, offset, count))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Sends each command of `pipeline` on its own and gathers the replies in order.
async fn split_pipeline(
    conn: ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let replies: Vec<RedisResult<Value>> = futures::stream::iter(pipeline.cmd_iter().cloned())
        .map(|cmd: Cmd| {
            let mut conn = conn.clone();
            async move { conn.req_packed_command(&cmd).await }
        })
        .buffered(CLUSTER_PIPELINE_FANOUT)
        .skip(offset)
        .take(count)
        .collect()
        .await;
    replies.into_iter().collect()
}
