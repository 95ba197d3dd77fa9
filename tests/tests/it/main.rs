//! End-to-end tests of Sluice against the real RabbitMQ and Redis; one namespace per test.

mod pipeline;
mod routing;
mod seeds;
