//! Property tests of the replay window against a reference model: the set of
//! every counter accepted so far and the rule that a counter is accepted iff
//! it is below `REJECT_AFTER_MESSAGES`, was not seen before, and is no more
//! than `WINDOW_SIZE` behind the highest counter seen.

use std::collections::BTreeSet;

use proptest::prelude::*;
use wiremesh_core::consts::REJECT_AFTER_MESSAGES;
use wiremesh_core::replay::{ReplayWindow, WINDOW_SIZE};

#[derive(Default)]
struct Model {
    seen: BTreeSet<u64>,
}

impl Model {
    fn highest(&self) -> Option<u64> {
        self.seen.last().copied()
    }

    fn accepts(&self, counter: u64) -> bool {
        counter < REJECT_AFTER_MESSAGES
            && !self.seen.contains(&counter)
            && match self.highest() {
                None => true,
                Some(h) => h.saturating_sub(counter) <= WINDOW_SIZE,
            }
    }

    fn update(&mut self, counter: u64) -> bool {
        let ok = self.accepts(counter);
        if ok {
            self.seen.insert(counter);
        }
        ok
    }
}

/// How the next counter relates to what was received so far; resolved
/// against the model's state when the sequence runs.
#[derive(Clone, Debug)]
enum Step {
    /// The next counter in order.
    InOrder,
    /// A counter `k` behind the highest: reordered (or, past the window, late).
    Behind(u64),
    /// Around the window's trailing edge: `WINDOW_SIZE - 2 + k` behind.
    Edge(u64),
    /// One of the counters already received (the `i`-th, modulo their number).
    Duplicate(usize),
    /// A jump `k` ahead of the highest.
    Ahead(u64),
    /// Near the limit: `REJECT_AFTER_MESSAGES - 3 + k`.
    NearLimit(u64),
    /// Any counter at all.
    Any(u64),
    /// Ask `check` only, as for a packet that then fails to authenticate.
    CheckOnly(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => Just(Step::InOrder),
        4 => (0u64..300).prop_map(Step::Behind),
        2 => (0u64..WINDOW_SIZE + 200).prop_map(Step::Behind),
        3 => (0u64..5).prop_map(Step::Edge),
        3 => any::<usize>().prop_map(Step::Duplicate),
        2 => (1u64..200).prop_map(Step::Ahead),
        1 => prop_oneof![Just(64u64), Just(WINDOW_SIZE), Just(WINDOW_SIZE + 1), Just(8192), 1u64..1 << 20]
            .prop_map(Step::Ahead),
        1 => (1u64..1 << 62).prop_map(Step::Ahead),
        1 => (0u64..6).prop_map(Step::NearLimit),
        1 => any::<u64>().prop_map(Step::Any),
        2 => (0u64..WINDOW_SIZE + 200).prop_map(Step::CheckOnly),
    ]
}

fn resolve(step: &Step, model: &Model, history: &[u64]) -> (u64, bool) {
    let h = model.highest();
    let behind = |k: u64| h.map_or(k, |h| h.saturating_sub(k));
    match *step {
        Step::InOrder => (h.map_or(0, |h| h.saturating_add(1)), true),
        Step::Behind(k) => (behind(k), true),
        Step::Edge(k) => (behind(WINDOW_SIZE - 2 + k), true),
        Step::Duplicate(i) if !history.is_empty() => (history[i % history.len()], true),
        Step::Duplicate(_) => (0, true),
        Step::Ahead(k) => (h.unwrap_or(0).saturating_add(k), true),
        Step::NearLimit(k) => (REJECT_AFTER_MESSAGES - 3 + k, true),
        Step::Any(c) => (c, true),
        Step::CheckOnly(k) => (behind(k), false),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn matches_reference_model(steps in prop::collection::vec(step(), 1..400)) {
        let mut window = ReplayWindow::new();
        let mut model = Model::default();
        let mut history: Vec<u64> = Vec::new();
        for s in &steps {
            let (counter, update) = resolve(s, &model, &history);
            let want = model.accepts(counter);
            prop_assert_eq!(window.check(counter), want, "check({}) after {:?}", counter, model.highest());
            if update {
                prop_assert_eq!(window.update(counter), want, "update({})", counter);
                model.update(counter);
                history.push(counter);
            }
            prop_assert_eq!(window.highest(), model.highest());
        }
        // Everything inside the window now answers as the model does.
        if let Some(h) = model.highest() {
            for counter in h.saturating_sub(WINDOW_SIZE + 2)..=h.saturating_add(2) {
                prop_assert_eq!(window.check(counter), model.accepts(counter), "final check({})", counter);
            }
        }
    }

    #[test]
    fn check_never_changes_the_window(counters in prop::collection::vec(0u64..20_000, 1..200), probe in any::<u64>()) {
        let mut window = ReplayWindow::new();
        for &c in &counters {
            window.update(c);
        }
        let before: Vec<bool> = (0..20_100).map(|c| window.check(c)).collect();
        let highest = window.highest();
        window.check(probe);
        prop_assert_eq!(window.highest(), highest);
        prop_assert_eq!((0..20_100).map(|c| window.check(c)).collect::<Vec<_>>(), before);
    }
}

#[test]
fn in_order_then_every_duplicate_rejected() {
    let mut window = ReplayWindow::new();
    for c in 0..3 * WINDOW_SIZE {
        assert!(window.update(c));
    }
    let h = 3 * WINDOW_SIZE - 1;
    for c in h - WINDOW_SIZE..=h {
        assert!(!window.check(c), "{c} seen");
    }
    assert!(!window.check(h - WINDOW_SIZE - 1));
    assert!(window.check(h + 1));
}
