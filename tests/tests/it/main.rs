//! End-to-end tests of Sluice against the real RabbitMQ and Redis; one namespace per test.

mod api_errors;
mod chaos;
mod cluster;
mod compat;
mod lifecycle;
mod logs;
mod openapi;
mod outages;
mod pacing;
mod pipeline;
mod retries;
mod routing;
mod seeds;
mod tenancy;
mod validation;
