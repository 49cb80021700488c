//! Several API and bridge instances in one stack ([`StackOptions::apis`],
//! [`StackOptions::bridges`]): each addressed by its index (0 is the instance every stack
//! has), killed, restarted and waited for one at a time.
//!
//! [`StackOptions::apis`]: super::StackOptions::apis
//! [`StackOptions::bridges`]: super::StackOptions::bridges

use std::time::Duration;

use super::{lock, Service, Stack};
use crate::process::Process;

/// What a bridge logs once it has subscribed to the device topics.
const SUBSCRIBED: &str = "Subscribed to device topics";

impl Stack {
    /// How many instances of the API or the bridge the stack runs.
    pub fn instances(&self, which: Service) -> usize {
        match which {
            Service::Api => 1 + lock(&self.more_apis).len(),
            Service::Bridge => 1 + lock(&self.more_bridges).len(),
        }
    }

    /// Runs `f` on instance `i` of the API or the bridge.
    pub(super) fn with_instance<T>(
        &self,
        which: Service,
        i: usize,
        f: impl FnOnce(&mut Process) -> T,
    ) -> T {
        if i == 0 {
            return f(&mut lock(self.service(which)));
        }
        let more = match which {
            Service::Api => &self.more_apis,
            Service::Bridge => &self.more_bridges,
        };
        let mut more = lock(more);
        let p = more
            .get_mut(i - 1)
            .unwrap_or_else(|| panic!("the stack has no {which:?} instance {i}"));
        f(p)
    }

    /// SIGKILLs instance `i` of the API or the bridge. For an API behind the balancer,
    /// waits a moment so the balancer has closed the connections to it (as a load
    /// balancer's health check takes a dead instance out), and the next call goes elsewhere.
    pub async fn kill_instance(&self, which: Service, i: usize) {
        self.with_instance(which, i, Process::kill);
        if matches!(which, Service::Api) && self.balancer.is_some() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The log of instance `i` of the API or the bridge so far (invalid UTF-8 replaced).
    pub fn instance_log(&self, which: Service, i: usize) -> String {
        let path = self.with_instance(which, i, |p| p.log.clone());
        String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
    }

    /// Starts instance `i` again (after killing it, if it runs) and waits until it works:
    /// an API answers `/healthz` on its own port, a bridge has subscribed to the device
    /// topics again.
    pub async fn restart_instance(&self, which: Service, i: usize) {
        let subscribed = self.instance_log(which, i).matches(SUBSCRIBED).count();
        self.with_instance(which, i, |p| {
            p.kill();
            p.start();
        });
        match which {
            Service::Api => self.wait_instance_healthy(i, Duration::from_secs(60)).await,
            Service::Bridge => {
                self.wait_bridge_subscribed(i, subscribed + 1, Duration::from_secs(30))
                    .await
            }
        }
    }

    /// Waits until every bridge instance has subscribed to the device topics (on an
    /// external broker, where the broker's port says nothing about the bridges).
    pub async fn wait_bridges_subscribed(&self, timeout: Duration) {
        for i in 0..self.instances(Service::Bridge) {
            self.wait_bridge_subscribed(i, 1, timeout).await;
        }
    }

    /// Waits until bridge instance `i` has logged its `times`-th subscription.
    async fn wait_bridge_subscribed(&self, i: usize, times: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self
            .instance_log(Service::Bridge, i)
            .matches(SUBSCRIBED)
            .count()
            < times
        {
            self.assert_alive();
            assert!(
                tokio::time::Instant::now() < deadline,
                "bridge instance {i} did not subscribe to the device topics within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
