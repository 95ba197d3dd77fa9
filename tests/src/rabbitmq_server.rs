//! A private RabbitMQ node for tests that crash or stall the broker: its own node name, port, data
//! and log directories, never the shared node on 5672.

use sluice_cli::services::RabbitNode;

/// One RabbitMQ node on a spare port; killed and cleaned up on drop.
pub struct RabbitServer {
    inner: RabbitNode,
}

impl RabbitServer {
    /// Starts a node in a fresh directory and waits until it accepts AMQP connections.
    pub fn start() -> Self {
        let port = crate::spare_port();
        let dir = std::env::temp_dir().join(format!("sluice-rabbitmq-{port}"));
        std::fs::remove_dir_all(&dir).ok();
        let inner = RabbitNode::start(port, &dir, "sluice-test").expect("private RabbitMQ node up");
        Self { inner }
    }

    /// Starts the node again on the same port and data (durable queues and their messages survive).
    pub fn restart(&mut self) {
        self.inner
            .restart()
            .expect("private RabbitMQ node up again");
    }

    /// `kill -9` of the node's Erlang VM, as a crash.
    pub fn kill(&mut self) {
        self.inner.kill();
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the node's Erlang VM: SIGSTOP makes a broker that
    /// keeps its sockets open and answers nothing, the stall of a wedged node.
    pub fn signal(&self, signal: &str) {
        let pids = self.inner.vm_pids();
        assert!(
            !pids.is_empty(),
            "no Erlang VM found for {}",
            self.inner.node()
        );
        for pid in pids {
            crate::send_signal(pid, signal);
        }
    }

    /// Its URL for `amqp_url`.
    pub fn url(&self) -> String {
        self.inner.url()
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.inner.kill();
        std::fs::remove_dir_all(self.inner.dir()).ok();
    }
}
