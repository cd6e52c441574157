//! The queue's events as the protocol's (for the bus) and as lines (for a one-off
//! build's terminal).

use std::time::Duration;

use kiln_shared::error::Chain;
use kiln_shared::protocol::{BuildOutcome, BuildSummary, Event, QueuedBuild, RunningBuild, now_ms};

use crate::schedule::{Outcome, SchedEvent};

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The queue's events as the protocol's.
pub fn to_event(e: SchedEvent) -> Event {
    match e {
        SchedEvent::Queued {
            key,
            tag,
            build_id,
            reason,
        } => Event::Queued {
            build: QueuedBuild {
                id: build_id,
                package: key.package,
                arch: key.arch,
                tag,
                reason: reason.to_string(),
            },
        },
        SchedEvent::Started {
            key,
            tag,
            build_id,
            builder,
        } => Event::Started {
            build: RunningBuild {
                id: build_id,
                package: key.package,
                arch: key.arch,
                tag,
                builder: builder.as_str().to_owned(),
                started_at_ms: now_ms(),
                progress: None,
            },
        },
        SchedEvent::Finished {
            key,
            tag,
            build_id,
            outcome,
            duration,
        } => {
            let mut summary = BuildSummary {
                id: build_id,
                tag,
                outcome: BuildOutcome::Ok,
                duration_ms: ms(duration),
                digest: None,
                error: None,
                cache_hits: 0,
                steps: 0,
                builder: None,
                finished_at_ms: now_ms(),
                pulled_from: None,
            };
            let (package, arch) = (key.package, key.arch);
            match outcome {
                Outcome::Built(b) => {
                    summary.digest = Some(b.manifest.digest);
                    summary.cache_hits = b.cache_hits;
                    summary.steps = b.steps;
                    summary.pulled_from = b.pulled_from;
                    summary.builder = Some(b.builder);
                    Event::Finished {
                        package,
                        arch,
                        summary,
                    }
                }
                Outcome::Failed(e) => {
                    summary.outcome = BuildOutcome::Failed;
                    summary.error = Some(Chain(&e).to_string());
                    Event::Failed {
                        package,
                        arch,
                        summary,
                    }
                }
                Outcome::Cancelled(e) => {
                    summary.outcome = BuildOutcome::Cancelled;
                    summary.error = Some(Chain(&e).to_string());
                    Event::Cancelled {
                        package,
                        arch,
                        summary,
                    }
                }
            }
        }
    }
}

/// A line for a one-off build's progress.
pub fn describe(e: &SchedEvent) -> Option<String> {
    match e {
        SchedEvent::Queued { .. } => None,
        SchedEvent::Started {
            key, tag, builder, ..
        } => Some(format!(
            "building {}:{tag} ({}) with {}",
            key.package,
            key.arch,
            builder.as_str()
        )),
        SchedEvent::Finished {
            key,
            tag,
            outcome,
            duration,
            ..
        } => Some(match outcome {
            Outcome::Built(b) if b.pulled_from.is_some() => format!(
                "pulled {}:{tag} ({}) from {} in {} ms: {}",
                key.package,
                key.arch,
                b.pulled_from.as_deref().unwrap_or_default(),
                duration.as_millis(),
                b.manifest.digest
            ),
            Outcome::Built(b) => format!(
                "built {}:{tag} ({}) in {:.1}s: {}",
                key.package,
                key.arch,
                duration.as_secs_f64(),
                b.manifest.digest
            ),
            Outcome::Failed(e) => {
                format!("FAILED {}:{tag} ({}): {}", key.package, key.arch, Chain(e))
            }
            Outcome::Cancelled(e) => {
                format!(
                    "cancelled {}:{tag} ({}): {}",
                    key.package,
                    key.arch,
                    Chain(e)
                )
            }
        }),
    }
}
