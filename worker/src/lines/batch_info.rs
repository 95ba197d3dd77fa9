//! What a worker knows about a batch and the routes of its models, read once per process.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_core::config::BudgetSettings;
use sluice_core::pacing::PaceLimits;

use crate::WorkerContext;

/// What a worker needs to know about a batch; fixed once the batch is dispatched.
#[derive(Debug)]
pub(super) struct BatchInfo {
    pub(super) endpoint: String,
    /// Unix seconds after which the batch expires.
    pub(super) expires_at: Option<i64>,
    /// The route of the batch's one model; `None` when its lines name different models (the
    /// batch has no `model`), each line then going by its own.
    pub(super) single: Option<Arc<ModelRoute>>,
    /// The routes of such a batch's models, each resolved once.
    pub(super) mixed: Mutex<HashMap<String, Arc<ModelRoute>>>,
    /// The owning tenant, its budget, and its metrics label (`unknown` for a tenant no longer
    /// configured, so the label stays bounded).
    pub(super) tenant: String,
    pub(super) budget: Option<BudgetSettings>,
    pub(super) tenant_label: String,
}

/// Where the lines of one model go.
#[derive(Debug)]
pub(super) struct ModelRoute {
    /// The model as the lines name it.
    pub(super) model: String,
    /// The provider the model routes to and its fleet limits; `None` when no provider serves it
    /// (the call then fails with the router's error).
    pub(super) pacing: Option<(String, PaceLimits)>,
}

/// Most routes kept per batch: the routes of a batch that names more models are resolved again
/// now and then, rather than growing the cache without bound (a provider serving `"*"` takes any
/// name).
const MAX_ROUTES_PER_BATCH: usize = 256;

impl ModelRoute {
    fn resolve(ctx: &WorkerContext, model: &str, endpoint: &str) -> Self {
        let pacing = ctx.upstream.provider_of(model, endpoint).map(|(_, p)| {
            (
                p.name.clone(),
                PaceLimits::new(&p.pacing, &ctx.settings.worker),
            )
        });
        Self {
            model: model.to_owned(),
            pacing,
        }
    }
}

impl BatchInfo {
    /// The tenant's budget, when it sets a limit.
    pub(super) fn limited_budget(&self) -> Option<&BudgetSettings> {
        self.budget.as_ref().filter(|b| b.is_limited())
    }

    /// The route of a line with `body`: the batch's one, or, in a batch of several models, that
    /// of the model the line names.
    pub(super) fn route(&self, ctx: &WorkerContext, body: &RawValue) -> Arc<ModelRoute> {
        if let Some(single) = &self.single {
            return single.clone();
        }
        #[derive(Deserialize)]
        struct ModelProbe<'a> {
            #[serde(borrow)]
            model: Option<Cow<'a, str>>,
        }
        // Validation saw a model on every line; one that has none here gets the router's error.
        let probe = serde_json::from_str::<ModelProbe<'_>>(body.get()).ok();
        let model = probe
            .as_ref()
            .and_then(|p| p.model.as_deref())
            .unwrap_or("");
        let mut routes = self.mixed.lock().expect("routes lock");
        if let Some(route) = routes.get(model) {
            return route.clone();
        }
        if routes.len() >= MAX_ROUTES_PER_BATCH {
            routes.clear();
        }
        let route = Arc::new(ModelRoute::resolve(ctx, model, &self.endpoint));
        routes.insert(model.to_owned(), route.clone());
        route
    }
}

/// Per-process cache of [`BatchInfo`], so a line costs no extra Redis read.
#[derive(Debug, Default, Clone)]
pub(super) struct BatchInfoCache(Arc<Mutex<HashMap<String, Arc<BatchInfo>>>>);

impl BatchInfoCache {
    pub(super) async fn get(
        &self,
        ctx: &WorkerContext,
        batch: &str,
    ) -> anyhow::Result<Option<Arc<BatchInfo>>> {
        if let Some(info) = self.0.lock().expect("cache lock").get(batch) {
            return Ok(Some(info.clone()));
        }
        let Some(meta) = ctx.store.get_batch(batch).await? else {
            return Ok(None);
        };
        let endpoint = meta.endpoint.as_deref().unwrap_or_default().to_owned();
        let single = meta
            .model
            .as_deref()
            .map(|model| Arc::new(ModelRoute::resolve(ctx, model, &endpoint)));
        let tenant = meta.tenant.as_str().to_owned();
        let configured = ctx.settings.tenants.iter().find(|t| t.id == tenant);
        let info = Arc::new(BatchInfo {
            endpoint,
            expires_at: meta.expires_at,
            single,
            mixed: Mutex::default(),
            budget: configured.and_then(|t| t.budget.clone()),
            tenant_label: configured.map_or("unknown", |t| t.id.as_str()).to_owned(),
            tenant,
        });
        let mut map = self.0.lock().expect("cache lock");
        if map.len() > 10_000 {
            map.clear();
        }
        map.insert(batch.to_owned(), info.clone());
        Ok(Some(info))
    }
}
