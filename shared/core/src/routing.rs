//! Provider routing: which configured provider runs a model, under which upstream name.
//!
//! A model resolves, in this order:
//! 1. **task models** (`extract`, `summarize`, `classify`): run by `[tasks] model`, itself routed
//!    like any model below (only on `/v1/chat/completions`);
//! 2. **provider prefix** `prefix/model`: the provider *named* `prefix`, upstream model `model`
//!    (a name like `meta-llama/Llama-3.1-8B` whose prefix names no provider is an ordinary name);
//! 3. **flavor suffix** `model:flavor`: the first provider listing `flavor` in `flavors` that serves
//!    `model`, upstream model `model` (a suffix no provider lists as a flavor is part of the name,
//!    as in Ollama's `llama3:8b`);
//! 4. otherwise the first provider serving the model (`models`, `"*"` = any).
//!
//! Among several providers serving a model, the first one that accepts batch work and supports the
//! endpoint wins; when none does, the first one's reason is the error.

use crate::config::{ProviderSettings, TaskSettings};
use crate::domain::task_model;

/// The one endpoint task models run on.
pub const TASK_ENDPOINT: &str = "/v1/chat/completions";

/// Where a model's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Index of the provider in the configuration.
    pub provider: usize,
    /// The provider's name.
    pub provider_name: String,
    /// The model name to send upstream (prefix and flavor removed).
    pub upstream_model: String,
}

/// What a batch's model runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A provider's model.
    Model(Route),
    /// A task model, run by the backing model's route.
    Task {
        /// The task (`extract`, `summarize`, `classify`).
        task: &'static str,
        /// The route of the model that runs it.
        backing: Route,
    },
}

/// Why a model cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("No model provider is configured for batch work.")]
    /// No provider is configured at all.
    NoProviders,
    #[error("The model '{model}' does not exist or is not served by any configured provider.")]
    /// No provider serves the model.
    ModelNotFound {
        /// The model asked for.
        model: String,
    },
    #[error(
        "The model '{model}' is served by provider '{provider}', which does not support {endpoint}."
    )]
    /// The provider serving the model does not serve the endpoint.
    EndpointUnsupported {
        /// The model asked for.
        model: String,
        /// The provider serving it.
        provider: String,
        /// The endpoint asked for.
        endpoint: String,
    },
    #[error(
        "The model '{model}' is served by provider '{provider}', which does not support batch requests."
    )]
    /// The provider serving the model does not take batch work.
    BatchUnsupported {
        /// The model asked for.
        model: String,
        /// The provider serving it.
        provider: String,
    },
    #[error(
        "The task model '{model}' is not available: no provider is configured for it ({reason})."
    )]
    /// No provider is configured for the task model's backing model.
    TaskUnavailable {
        /// The task model.
        model: String,
        /// Why it is unavailable.
        reason: String,
    },
    #[error("The task model '{model}' only runs on {TASK_ENDPOINT}, not {endpoint}.")]
    /// A task model asked on another endpoint than the one tasks run on.
    TaskEndpoint {
        /// The task model.
        model: String,
        /// The endpoint asked for.
        endpoint: String,
    },
}

impl RouteError {
    /// The error code clients see (HTTP envelope or `errors.data`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoProviders | Self::TaskUnavailable { .. } => "no_provider_configured",
            Self::ModelNotFound { .. } => "model_not_found",
            Self::EndpointUnsupported { .. } | Self::TaskEndpoint { .. } => "unsupported_endpoint",
            Self::BatchUnsupported { .. } => "not_implemented",
        }
    }

    /// The HTTP status where the error is known while the request is being answered: 503 when no
    /// provider is configured for the work, 501 when its provider takes no batch work, else 400.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::NoProviders | Self::TaskUnavailable { .. } => 503,
            Self::BatchUnsupported { .. } => 501,
            _ => 400,
        }
    }
}

impl ProviderSettings {
    /// Whether this provider supports `endpoint`.
    pub fn supports(&self, endpoint: &str) -> bool {
        self.endpoints.is_empty() || self.endpoints.iter().any(|e| e == endpoint)
    }

    fn usable_for(&self, model: &str, endpoint: &str) -> Result<(), RouteError> {
        if !self.batch {
            return Err(RouteError::BatchUnsupported {
                model: model.to_owned(),
                provider: self.name.clone(),
            });
        }
        if !self.supports(endpoint) {
            return Err(RouteError::EndpointUnsupported {
                model: model.to_owned(),
                provider: self.name.clone(),
                endpoint: endpoint.to_owned(),
            });
        }
        Ok(())
    }
}

/// Resolves a model to a provider (task models are not considered; see [`resolve_target`]).
pub fn resolve(
    providers: &[ProviderSettings],
    model: &str,
    endpoint: &str,
) -> Result<Route, RouteError> {
    if providers.is_empty() {
        return Err(RouteError::NoProviders);
    }
    let not_found = || RouteError::ModelNotFound {
        model: model.to_owned(),
    };
    // 1. A provider prefix.
    if let Some((prefix, rest)) = model.split_once('/')
        && !rest.is_empty()
        && let Some((index, provider)) =
            providers.iter().enumerate().find(|(_, p)| p.name == prefix)
    {
        let base = match rest.rsplit_once(':') {
            Some((base, flavor))
                if !base.is_empty() && provider.flavors.iter().any(|f| f == flavor) =>
            {
                base
            }
            _ => rest,
        };
        if !provider.serves(base) {
            return Err(not_found());
        }
        provider.usable_for(model, endpoint)?;
        return Ok(route(index, provider, base));
    }
    // 2. A flavor suffix some provider declares.
    if let Some((base, flavor)) = model.rsplit_once(':')
        && !base.is_empty()
        && providers
            .iter()
            .any(|p| p.flavors.iter().any(|f| f == flavor))
    {
        let candidates = providers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.flavors.iter().any(|f| f == flavor) && p.serves(base));
        return pick(candidates, model, base, endpoint).unwrap_or_else(|| Err(not_found()));
    }
    // 3. The plain name.
    let candidates = providers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.serves(model));
    pick(candidates, model, model, endpoint).unwrap_or_else(|| Err(not_found()))
}

/// The first usable candidate, else the first candidate's reason; `None` without candidates.
fn pick<'a>(
    mut candidates: impl Iterator<Item = (usize, &'a ProviderSettings)>,
    model: &str,
    upstream_model: &str,
    endpoint: &str,
) -> Option<Result<Route, RouteError>> {
    let (first_index, first) = candidates.next()?;
    let first_reason = match first.usable_for(model, endpoint) {
        Ok(()) => return Some(Ok(route(first_index, first, upstream_model))),
        Err(e) => e,
    };
    for (index, provider) in candidates {
        if provider.usable_for(model, endpoint).is_ok() {
            return Some(Ok(route(index, provider, upstream_model)));
        }
    }
    Some(Err(first_reason))
}

fn route(index: usize, provider: &ProviderSettings, upstream_model: &str) -> Route {
    Route {
        provider: index,
        provider_name: provider.name.clone(),
        upstream_model: upstream_model.to_owned(),
    }
}

/// Resolves a batch's model, task models included.
pub fn resolve_target(
    providers: &[ProviderSettings],
    tasks: &TaskSettings,
    model: &str,
    endpoint: &str,
) -> Result<Target, RouteError> {
    let Some(task) = task_model(model) else {
        return resolve(providers, model, endpoint).map(Target::Model);
    };
    if endpoint != TASK_ENDPOINT {
        return Err(RouteError::TaskEndpoint {
            model: model.to_owned(),
            endpoint: endpoint.to_owned(),
        });
    }
    let Some(backing) = tasks.model.as_deref() else {
        return Err(RouteError::TaskUnavailable {
            model: model.to_owned(),
            reason: "[tasks] model is not set".into(),
        });
    };
    match resolve(providers, backing, TASK_ENDPOINT) {
        Ok(route) => Ok(Target::Task {
            task,
            backing: route,
        }),
        Err(e @ RouteError::BatchUnsupported { .. }) => Err(e),
        Err(e) => Err(RouteError::TaskUnavailable {
            model: model.to_owned(),
            reason: format!("backing model '{backing}': {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(name: &str, models: &[&str]) -> ProviderSettings {
        ProviderSettings {
            name: name.into(),
            base_url: format!("http://{name}/v1"),
            api_key_env: None,
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            endpoints: Vec::new(),
            batch: true,
            flavors: Vec::new(),
            pacing: Default::default(),
            refused_body_fields: Vec::new(),
        }
    }

    const CHAT: &str = "/v1/chat/completions";

    #[test]
    fn prefixes_pick_the_named_provider_and_strip_the_prefix() {
        let providers = [provider("local", &["*"]), provider("openai", &["*"])];
        let r = resolve(&providers, "openai/gpt-4o-mini", CHAT).unwrap();
        assert_eq!((r.provider, r.upstream_model.as_str()), (1, "gpt-4o-mini"));
        // A prefix that names no provider is part of the model name.
        let r = resolve(&providers, "meta-llama/Llama-3.1-8B", CHAT).unwrap();
        assert_eq!(
            (r.provider, r.upstream_model.as_str()),
            (0, "meta-llama/Llama-3.1-8B")
        );
        let only = [provider("openai", &["gpt-4o-mini"])];
        assert_eq!(
            resolve(&only, "openai/gpt-5", CHAT).unwrap_err().code(),
            "model_not_found"
        );
    }

    #[test]
    fn flavors_route_to_the_provider_declaring_them() {
        let mut cheap = provider("cheap", &["glm-4.7"]);
        cheap.flavors = vec!["batch".into()];
        let providers = [provider("fast", &["glm-4.7", "llama3:8b"]), cheap];
        let r = resolve(&providers, "glm-4.7:batch", CHAT).unwrap();
        assert_eq!(
            (r.provider_name.as_str(), r.upstream_model.as_str()),
            ("cheap", "glm-4.7")
        );
        let r = resolve(&providers, "glm-4.7", CHAT).unwrap();
        assert_eq!(r.provider_name, "fast");
        // A suffix no provider declares is part of the name (Ollama tags).
        let r = resolve(&providers, "llama3:8b", CHAT).unwrap();
        assert_eq!(r.upstream_model, "llama3:8b");
        assert_eq!(
            resolve(&providers, "other:batch", CHAT).unwrap_err().code(),
            "model_not_found"
        );
    }

    #[test]
    fn batch_and_endpoint_support_decide_between_providers() {
        let mut realtime = provider("realtime", &["m"]);
        realtime.batch = false;
        let mut embed = provider("embed", &["m"]);
        embed.endpoints = vec!["/v1/embeddings".into()];
        // The first usable provider wins; without one, the first one's reason is the error.
        let providers = [realtime.clone(), embed.clone()];
        assert_eq!(
            resolve(&providers, "m", "/v1/embeddings")
                .unwrap()
                .provider_name,
            "embed"
        );
        let err = resolve(&providers, "m", CHAT).unwrap_err();
        assert_eq!((err.code(), err.http_status()), ("not_implemented", 501));
        let err = resolve(&[embed], "m", CHAT).unwrap_err();
        assert_eq!(
            (err.code(), err.http_status()),
            ("unsupported_endpoint", 400)
        );
        assert!(err.to_string().contains(CHAT), "{err}");
        let err = resolve(&[], "m", CHAT).unwrap_err();
        assert_eq!(err.http_status(), 503);
        let err = resolve(&[realtime], "realtime/m", CHAT).unwrap_err();
        assert_eq!(err.http_status(), 501);
    }

    #[test]
    fn task_models_need_a_backing_model_and_chat_completions() {
        let providers = [provider("openai", &["gpt-4o-mini"])];
        let mut tasks = TaskSettings::default();
        let err = resolve_target(&providers, &tasks, "extract", CHAT).unwrap_err();
        assert_eq!(err.http_status(), 503);
        tasks.model = Some("openai/gpt-4o-mini".into());
        match resolve_target(&providers, &tasks, "classify", CHAT).unwrap() {
            Target::Task { task, backing } => {
                assert_eq!(task, "classify");
                assert_eq!(backing.upstream_model, "gpt-4o-mini");
            }
            other => panic!("{other:?}"),
        }
        let err = resolve_target(&providers, &tasks, "summarize", "/v1/embeddings").unwrap_err();
        assert_eq!(err.code(), "unsupported_endpoint");
        tasks.model = Some("missing".into());
        let err = resolve_target(&providers, &tasks, "summarize", CHAT).unwrap_err();
        assert_eq!(err.http_status(), 503);
        assert!(matches!(
            resolve_target(&providers, &tasks, "gpt-4o-mini", CHAT).unwrap(),
            Target::Model(_)
        ));
    }
}
