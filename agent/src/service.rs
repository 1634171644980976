//! The agent as a service: the main loop around the [`Agent`] that talks to the service manager
//! and the operator.
//!
//! Owns: turning operator requests ([`Control`]: SIGTERM/SIGINT, SIGHUP) into the agent's staged
//! stop and reloads; `sd_notify` (`READY=1` once the sandbox is usable — configuration, key and
//! certificate were checked before the agent was built —, `STATUS=` lines with the connection
//! state and the tasks, `WATCHDOG=1` from this loop at half of `WATCHDOG_USEC`, `STOPPING=1` when
//! the drain starts, `RELOADING=1` around a reload); the metrics/health endpoint's view of the
//! agent ([`AgentProbe`]).
//!
//! The watchdog is sent from this loop after it has taken the task manager's lock (to count the
//! tasks for the status line), so a wedged loop or a deadlocked task manager stops the pings and
//! systemd restarts the agent.
//!
//! Must never: block (every step here is bookkeeping), or let a failed notification or reload
//! stop the agent.

use crate::daemon::{Agent, Stop};
use crate::link::{LinkPhase, LinkStatus};
use crate::metrics::{self, Metrics, MetricsListen, Probe};
use crate::notify::Notifier;
use crate::reload::Reloader;
use crate::renew::Renewer;
use crate::tasks::{Executor, Phase, TaskManager};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// An operator request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGTERM/SIGINT: the first drains, the second cancels running tasks at once.
    Stop,
    /// SIGHUP.
    Reload,
}

/// How the service ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Drained (or cancelled) and closed cleanly.
    Clean,
    /// A third stop request: the caller should exit at once.
    Forced,
}

/// How often the status line and readiness are looked at when no watchdog asks for more.
pub const STATUS_EVERY: Duration = Duration::from_secs(1);

/// What the service needs besides the agent.
pub struct ServiceParts {
    pub notifier: Notifier,
    pub metrics: Metrics,
    /// Serve `/metrics`, `/healthz`, `/readyz` here.
    pub metrics_listen: Option<MetricsListen>,
    /// `None`: reload requests are refused with a log line.
    pub reloader: Option<Reloader>,
    /// The executor the agent runs tasks on (for readiness).
    pub executor: Arc<dyn Executor>,
}

/// The endpoint's view of the agent.
pub struct AgentProbe {
    status: watch::Receiver<LinkStatus>,
    tasks: TaskManager,
    executor: Arc<dyn Executor>,
    draining: Arc<AtomicBool>,
    renewer: Option<Renewer>,
}

impl AgentProbe {
    fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("draining (shutting down)".into());
        }
        self.executor.availability()?;
        match &self.status.borrow().phase {
            LinkPhase::Connected { .. } => Ok(()),
            _ => Err("not connected to the control plane".into()),
        }
    }
}

/// Counts of held tasks by phase name (as in [`metrics::TASK_PHASES`]).
pub fn tasks_by_phase(tasks: &TaskManager) -> Vec<(&'static str, usize)> {
    let mut counts: Vec<(&'static str, usize)> =
        metrics::TASK_PHASES.iter().map(|p| (*p, 0)).collect();
    for t in tasks.held_tasks() {
        let name = match tasks.phase(t.task_id) {
            Some(Phase::Received) => "received",
            Some(Phase::ReceivingInputs) => "receiving_inputs",
            Some(Phase::Running) => "running",
            Some(Phase::Finishing) => "finishing",
            Some(Phase::Done) | None => continue,
        };
        if let Some(c) = counts.iter_mut().find(|(n, _)| *n == name) {
            c.1 += 1;
        }
    }
    counts
}

/// The link phase as a metric state name.
pub fn link_state_name(phase: &LinkPhase) -> &'static str {
    match phase {
        LinkPhase::Connecting { .. } => "connecting",
        LinkPhase::Connected { .. } => "connected",
        LinkPhase::Disconnected { .. } => "disconnected",
        LinkPhase::Stopped => "stopped",
    }
}

impl Probe for AgentProbe {
    fn refresh(&self, m: &Metrics) {
        let st = self.status.borrow().clone();
        m.set_link(link_state_name(&st.phase), st.connections, st.failures);
        m.set_renewals(st.renewals);
        m.set_tasks(&tasks_by_phase(&self.tasks), self.tasks.slots());
        if let Some(s) = self.tasks.spool_stats() {
            m.set_spool(s.bytes, s.waits);
        }
        m.set_draining(self.draining.load(Ordering::SeqCst));
        m.set_ready(self.readiness().is_ok());
        if let Some(r) = &self.renewer {
            if let Ok(v) = r.current_validity() {
                m.set_cert_expiry(v.not_after);
            }
        }
    }

    fn ready(&self) -> Result<(), String> {
        self.readiness()
    }

    fn live(&self) -> Result<(), String> {
        // Takes the task manager's lock: a deadlock shows as a probe that never answers.
        let _ = self.tasks.held();
        Ok(())
    }
}

/// The `STATUS=` text: connection state, tasks, sandbox, shutdown stage.
pub fn status_text(
    link: &LinkStatus,
    busy: usize,
    held: usize,
    slots: u32,
    sandbox: &Result<(), String>,
    stop: Stop,
) -> String {
    let conn = match &link.phase {
        LinkPhase::Connected {
            agent_id, version, ..
        } => format!("connected as {agent_id} (protocol v{version})"),
        LinkPhase::Connecting { attempt } => match &link.last_error {
            Some(e) if *attempt > 0 => {
                format!("connecting (attempt {}; last error: {e})", attempt + 1)
            }
            _ => "connecting".to_string(),
        },
        LinkPhase::Disconnected { backoff, .. } => format!(
            "disconnected, retrying in {} (last error: {})",
            humantime::format_duration(Duration::from_secs(backoff.as_secs().max(1))),
            link.last_error.as_deref().unwrap_or("none")
        ),
        LinkPhase::Stopped => "stopped".to_string(),
    };
    let mut s = match stop {
        Stop::No => String::new(),
        Stop::Drain => "draining: ".to_string(),
        Stop::Now => "stopping now: ".to_string(),
    };
    s.push_str(&conn);
    s.push_str(&format!("; tasks running {busy}/{slots}"));
    if held > busy {
        s.push_str(&format!(", {} finishing", held - busy));
    }
    if let Err(e) = sandbox {
        s.push_str(&format!("; {e}"));
    }
    if let Some(e) = &link.renew_error {
        s.push_str(&format!("; certificate renewal failing: {e}"));
    }
    if s.len() > 400 {
        let mut end = 397;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

fn log_notify_error(r: Result<(), crate::notify::NotifyError>, warned: &mut bool) {
    if let Err(e) = r {
        if !*warned {
            warn!(error = %e, "cannot notify the service manager (further failures are not logged)");
            *warned = true;
        }
    }
}

/// Run the agent as a service until it has stopped. `control` carries the operator's requests;
/// when it closes, that counts as one stop request.
pub async fn run(agent: Agent, parts: ServiceParts, mut control: mpsc::Receiver<Control>) -> Ended {
    let ServiceParts {
        notifier,
        metrics,
        metrics_listen,
        mut reloader,
        executor,
    } = parts;
    let mut status_rx = agent.status();
    let tasks = agent.tasks();
    let draining = Arc::new(AtomicBool::new(false));
    let probe = Arc::new(AgentProbe {
        status: agent.status(),
        tasks: tasks.clone(),
        executor: executor.clone(),
        draining: draining.clone(),
        renewer: agent.renewer(),
    });

    let endpoint_stop = CancellationToken::new();
    let mut endpoint = None;
    if let Some(listen) = &metrics_listen {
        match metrics::bind(listen, metrics.clone(), probe.clone()).await {
            Ok(server) => {
                endpoint = Some(tokio::spawn(server.run(endpoint_stop.clone())));
            }
            Err(e) => error!(error = %e, "metrics and health endpoint not available"),
        }
    }

    let (stop_tx, stop_rx) = watch::channel(Stop::No);
    let mut agent_task = tokio::spawn(agent.run_until(stop_rx));
    let mut stop = Stop::No;
    let mut ready_sent = false;
    let mut last_status = String::new();
    let mut notify_warned = false;
    let mut control_open = true;
    let mut status_open = true;

    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watchdog_every = notifier.watchdog_interval();
    let mut watchdog_tick =
        tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if let Some(w) = watchdog_every {
        info!(every = %humantime::format_duration(w), "systemd watchdog enabled");
    }

    let ended = loop {
        let request = tokio::select! {
            r = &mut agent_task => {
                if let Err(e) = r {
                    error!(error = %e, "agent task ended abnormally");
                }
                break Ended::Clean;
            }
            c = control.recv(), if control_open => {
                if c.is_none() {
                    control_open = false;
                }
                Some(c.unwrap_or(Control::Stop))
            }
            _ = watchdog_tick.tick(), if watchdog_every.is_some() => {
                // Proves this loop and the task manager's lock are alive.
                let _ = tasks.held();
                log_notify_error(notifier.watchdog(), &mut notify_warned);
                None
            }
            _ = status_tick.tick() => None,
            r = status_rx.changed(), if status_open => {
                if r.is_err() {
                    // The link is gone; the agent task ends next.
                    status_open = false;
                }
                None
            }
        };
        match request {
            Some(Control::Stop) => {
                stop = match stop {
                    Stop::No => Stop::Drain,
                    Stop::Drain => Stop::Now,
                    Stop::Now => break Ended::Forced,
                };
                draining.store(true, Ordering::SeqCst);
                metrics.set_draining(true);
                let _ = stop_tx.send(stop);
                if stop == Stop::Drain {
                    let text = format!("draining: {} task(s) held", tasks.held());
                    log_notify_error(notifier.stopping(&text), &mut notify_warned);
                }
            }
            Some(Control::Reload) => {
                log_notify_error(notifier.reloading(), &mut notify_warned);
                let outcome = match reloader.as_mut() {
                    Some(r) => r.reload().map_err(|e| e.to_string()),
                    None => Err("reloading is not set up for this agent".to_string()),
                };
                let line = match outcome {
                    Ok(report) => {
                        metrics.reload(report.ok());
                        if report.ok() {
                            info!(summary = %report.summary(), "reloaded (SIGHUP)");
                        } else {
                            warn!(summary = %report.summary(), "reload (SIGHUP) partly failed; the old settings stay for those parts");
                        }
                        report.summary()
                    }
                    Err(e) => {
                        metrics.reload(false);
                        error!(error = %e, "reload (SIGHUP) refused; the running configuration stays");
                        format!("reload refused: {e}")
                    }
                };
                // READY=1 ends the reload for the service manager (if we were ready before).
                if ready_sent {
                    log_notify_error(notifier.ready(&line), &mut notify_warned);
                } else {
                    log_notify_error(notifier.status(&line), &mut notify_warned);
                }
                last_status = line;
                continue;
            }
            None => {}
        }

        let sandbox = executor.availability();
        if !ready_sent && stop == Stop::No && sandbox.is_ok() {
            ready_sent = true;
            info!("start-up checks passed (configuration, key, certificate, Docker sandbox)");
            let text = status_text(
                &status_rx.borrow(),
                tasks.busy_slots(),
                tasks.held(),
                tasks.slots(),
                &sandbox,
                stop,
            );
            log_notify_error(notifier.ready(&text), &mut notify_warned);
            last_status = text;
            continue;
        }
        let text = status_text(
            &status_rx.borrow_and_update(),
            tasks.busy_slots(),
            tasks.held(),
            tasks.slots(),
            &sandbox,
            stop,
        );
        if text != last_status {
            log_notify_error(notifier.status(&text), &mut notify_warned);
            last_status = text;
        }
    };
    if ended == Ended::Forced {
        agent_task.abort();
    }
    endpoint_stop.cancel();
    if let Some(e) = endpoint {
        let _ = e.await;
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(phase: LinkPhase) -> LinkStatus {
        LinkStatus {
            phase,
            connections: 1,
            failures: 2,
            last_error: Some("connection refused".into()),
            renewals: 0,
            renew_error: None,
        }
    }

    #[test]
    fn status_lines() {
        let connected = link(LinkPhase::Connected {
            agent_id: "runner-1".into(),
            version: 1,
            heartbeat_interval: Duration::from_secs(15),
        });
        assert_eq!(
            status_text(&connected, 1, 2, 4, &Ok(()), Stop::No),
            "connected as runner-1 (protocol v1); tasks running 1/4, 1 finishing"
        );
        assert_eq!(
            status_text(&connected, 0, 0, 4, &Err("Docker sandbox unavailable: x".into()), Stop::Drain),
            "draining: connected as runner-1 (protocol v1); tasks running 0/4; Docker sandbox unavailable: x"
        );
        let waiting = link(LinkPhase::Disconnected {
            attempt: 3,
            backoff: Duration::from_millis(2500),
        });
        assert_eq!(
            status_text(&waiting, 0, 0, 1, &Ok(()), Stop::No),
            "disconnected, retrying in 2s (last error: connection refused); tasks running 0/1"
        );
        let connecting = link(LinkPhase::Connecting { attempt: 2 });
        assert_eq!(
            status_text(&connecting, 0, 0, 1, &Ok(()), Stop::Now),
            "stopping now: connecting (attempt 3; last error: connection refused); tasks running 0/1"
        );
        let mut renew = connected.clone();
        renew.renew_error = Some("no renew_response within 5m".into());
        assert!(status_text(&renew, 0, 0, 1, &Ok(()), Stop::No)
            .ends_with("certificate renewal failing: no renew_response within 5m"));
        let mut long = connected;
        long.phase = LinkPhase::Disconnected {
            attempt: 1,
            backoff: Duration::ZERO,
        };
        long.last_error = Some("é".repeat(400));
        let s = status_text(&long, 0, 0, 1, &Ok(()), Stop::No);
        assert!(s.len() <= 400 && s.ends_with("..."), "{}", s.len());
    }
}
