//! Fault hooks for the test suite: a panic (or an early end) armed for one relay lane, or
//! a panic for one table's lane manager, each taken once. Without the `fault-hooks` feature (which only the integration
//! tests turn on) every hook is an empty function.

#[cfg(feature = "fault-hooks")]
use std::sync::Mutex;

/// Where a panic is armed.
#[cfg(feature = "fault-hooks")]
#[derive(Debug, PartialEq, Eq)]
enum Fault {
    Lane(String, u32),
    LaneEnds(String, u32),
    Manager(String),
}

#[cfg(feature = "fault-hooks")]
static ARMED: Mutex<Vec<Fault>> = Mutex::new(Vec::new());

#[cfg(feature = "fault-hooks")]
fn take(fault: Fault) -> bool {
    let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    match armed.iter().position(|f| *f == fault) {
        Some(i) => {
            armed.remove(i);
            true
        }
        None => false,
    }
}

/// Makes the next start of `table`'s lane `lane` panic.
#[cfg(feature = "fault-hooks")]
pub fn arm_lane_panic(table: &str, lane: u32) {
    ARMED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Fault::Lane(table.to_owned(), lane));
}

/// Makes the next start of `table`'s lane `lane` end at once, as a lane whose connection
/// failed does.
#[cfg(feature = "fault-hooks")]
pub fn arm_lane_end(table: &str, lane: u32) {
    ARMED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Fault::LaneEnds(table.to_owned(), lane));
}

/// Makes the next rebalance of `table`'s lane manager panic.
#[cfg(feature = "fault-hooks")]
pub fn arm_manager_panic(table: &str) {
    ARMED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Fault::Manager(table.to_owned()));
}

/// A lane of `table` starts: panics, or says to end at once (true), as armed.
#[allow(unused_variables)]
pub fn lane(table: &str, lane: u32) -> bool {
    #[cfg(feature = "fault-hooks")]
    {
        if take(Fault::Lane(table.to_owned(), lane)) {
            panic!("fault hook: lane {lane} of {table}");
        }
        if take(Fault::LaneEnds(table.to_owned(), lane)) {
            return true;
        }
    }
    false
}

/// `table`'s lane manager rebalances.
#[allow(unused_variables)]
pub fn manager(table: &str) {
    #[cfg(feature = "fault-hooks")]
    if take(Fault::Manager(table.to_owned())) {
        panic!("fault hook: lane manager of {table}");
    }
}
