//! Which webhook events each endpoint already received, so a second announcement of an event
//! (a finalize retried after a crash) is not sent again.

use redis::AsyncCommands;

use super::{Result, Store};

impl Store {
    /// Whether `event_id` was delivered to the endpoint tagged `endpoint`.
    pub async fn webhook_delivered(&self, event_id: &str, endpoint: &str) -> Result<bool> {
        Ok(self
            .conn()
            .exists(self.keys.webhook_delivered(event_id, endpoint))
            .await?)
    }

    /// Records that `event_id` reached the endpoint tagged `endpoint`, for `ttl_secs`.
    pub async fn mark_webhook_delivered(
        &self,
        event_id: &str,
        endpoint: &str,
        ttl_secs: u64,
    ) -> Result<()> {
        let () = self
            .conn()
            .set_ex(self.keys.webhook_delivered(event_id, endpoint), 1, ttl_secs)
            .await?;
        Ok(())
    }
}
