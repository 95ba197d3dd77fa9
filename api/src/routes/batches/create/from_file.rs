//! The OpenAI create: a batch over an uploaded input file. Only parameters are checked here;
//! whether the file exists and its lines are valid is decided asynchronously by the dispatcher
//! (the batch then becomes `failed`), as OpenAI does.

use serde_json::Value;

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::routes::batches::admission;
use crate::routes::batches::params::CreateBatch;
use crate::routes::batches::record::store_reserved;
use crate::routes::batches::reservation::reserve_batch;
use crate::routes::bounds::check_id;
use crate::state::AppState;

/// The OpenAI create: a batch over an uploaded input file.
pub(crate) async fn create_from_json(
    state: &AppState,
    tenant: &Tenant,
    body: &Value,
) -> Result<Value, ApiError> {
    let params = CreateBatch::parse(body, state.settings.window_bounds())?;
    check_id(state, "input_file_id", &params.input_file_id)?;
    admission::admit(state, tenant, &params, params.priority()).await?;
    let batch_id = reserve_batch(state, tenant).await?;
    store_reserved(state, tenant, &batch_id, params).await
}
