//! Policies on traces: round statistics as the engine measures them.

use super::*;

fn limits() -> Limits {
    Limits {
        downtime_ms: 300,
        downtime_max_ms: 2000,
        rounds_max: 30,
        time_max_ms: 30_000,
    }
}

/// One round of a trace: (sent, ms, dirty, hot, pending, rate pages/s).
type Row = (u64, u64, u64, u64, u64, f64);

/// Feeds a trace to a policy; returns the decisions.
fn run(kind: PolicyKind, rows: &[Row], frags: &[Vec<u64>]) -> Vec<Decision> {
    let nfrag = frags.first().map_or(4, Vec::len);
    let mut p = Policy::new(kind, limits(), nfrag);
    let mut elapsed = 0;
    let mut out = Vec::new();
    for (i, &(sent, ms, dirty, hot, pending, rate)) in rows.iter().enumerate() {
        elapsed += ms;
        let s = RoundStats {
            round: i as u32 + 1,
            elapsed_ms: elapsed,
            round_ms: ms,
            sent_pages: sent,
            rate_pages_s: rate,
            dirty_pages: dirty,
            hot_pages: hot,
            pending_pages: pending,
            throttle_pct: out.last().map_or(0, |d: &Decision| d.throttle_pct),
            mem_pages: 65_536,
        };
        let f = frags.get(i).cloned().unwrap_or_else(|| vec![0; nfrag]);
        let d = p.decide(&s, &f);
        let stop = d.action != Action::Iterate;
        out.push(d);
        if stop {
            break;
        }
    }
    out
}

/// 256 MiB guest (65,536 pages) capped at 64 MiB/s (16,384 pages/s),
/// dirtying 3x that uniformly: every round finds most of memory dirty.
fn intensive_uniform(rounds: usize) -> Vec<Row> {
    let mut rows = vec![(65_536, 4000, 62_000, 0, 62_000, 16_384.0)];
    for _ in 1..rounds {
        rows.push((62_000, 3800, 61_000, 58_000, 61_000, 16_300.0));
    }
    rows
}

/// The same guest dirtying 0.5x the cap: the dirty set shrinks every round.
fn converging() -> Vec<Row> {
    vec![
        (65_536, 4000, 25_000, 0, 25_000, 16_384.0),
        (25_000, 1500, 10_000, 4_000, 10_000, 16_500.0),
        (10_000, 600, 6_000, 1_800, 6_000, 16_400.0),
        (6_000, 370, 2_100, 900, 2_100, 16_400.0),
    ]
}

#[test]
fn names_round_trip_and_unknown_names_are_refused() {
    for p in PolicyKind::ALL {
        assert_eq!(p.name().parse::<PolicyKind>().unwrap(), p);
        assert_eq!(
            serde_json::to_value(p).unwrap(),
            serde_json::json!(p.name())
        );
    }
    let e = "fast".parse::<PolicyKind>().unwrap_err();
    assert!(e.contains("adaptive"), "{e}");
    assert_eq!(PolicyKind::default(), PolicyKind::Adaptive);
}

#[test]
fn every_policy_stops_a_converging_guest_within_the_budget() {
    for p in PolicyKind::ALL {
        let d = run(p, &converging(), &[]);
        let last = d.last().unwrap();
        assert_eq!(last.action, Action::StopAndCopy, "{p}: {:?}", last);
        // 2,100 pages at 16,400 pages/s: 129 ms + 5.
        assert_eq!(last.estimate_ms, 134, "{p}");
        assert!(last.estimate_ms <= 300);
        assert_eq!(d.len(), 4, "{p}");
        assert!(d.iter().all(|x| x.throttle_pct == 0), "{p}");
    }
}

#[test]
fn baseline_never_converges_on_an_intensive_guest_and_gives_up_at_the_time_limit() {
    let d = run(PolicyKind::Baseline, &intensive_uniform(20), &[]);
    let last = d.last().unwrap();
    assert_eq!(last.action, Action::GiveUp);
    // 4000 + 7 x 3800 = 30,600 ms >= 30,000.
    assert_eq!(d.len(), 8);
    assert!(last.reason.starts_with("give up"), "{}", last.reason);
    assert!(d.iter().all(|x| x.throttle_pct == 0 && !x.defer_hot));
}

#[test]
fn mp_classifies_and_stops_early_within_the_cap() {
    // A hot-set guest: the pending set plateaus at ~20,000 pages (1.2 s at
    // the rate), over the 300 ms budget but within the 2 s cap.
    let rows: Vec<Row> = vec![
        (65_536, 4000, 24_000, 0, 24_000, 16_384.0),
        (24_000, 1500, 20_000, 15_000, 20_000, 16_000.0),
        (20_000, 1250, 19_800, 18_000, 19_800, 16_000.0),
        (19_800, 1240, 19_900, 18_500, 19_900, 16_000.0),
    ];
    let base = run(PolicyKind::Baseline, &rows, &[]);
    assert!(base.iter().all(|d| d.action == Action::Iterate));
    let mp = run(PolicyKind::Mp, &rows, &[]);
    let last = mp.last().unwrap();
    assert_eq!(last.action, Action::StopAndCopy, "{:?}", mp);
    assert_eq!(last.class, "memory-intensive");
    assert!(last.estimate_ms <= 1500, "{}", last.estimate_ms);
    // Dirtying 20,000 pages in 1.5 s (13,333/s) is over half the rate
    // (16,000/s): intensive after the first dirty round already.
    assert_eq!(mp.len(), 2);
}

#[test]
fn mp_does_not_stop_beyond_the_cap() {
    let d = run(PolicyKind::Mp, &intensive_uniform(20), &[]);
    // 61,000 pages at 16,300/s is ~3.7 s: over the cap, so mp alone gives up.
    assert_eq!(d.last().unwrap().action, Action::GiveUp);
    assert!(d
        .iter()
        .all(|x| x.class == "memory-intensive" || x.estimate_ms < 300 || x == &d[0]));
}

#[test]
fn auto_converge_throttles_stepwise_up_to_the_max() {
    let d = run(PolicyKind::AutoConverge, &intensive_uniform(40), &[]);
    let steps: Vec<u8> = d.iter().map(|x| x.throttle_pct).collect();
    // Round 1 is the bulk round: nothing is known yet. Then 20, 30, ... 99.
    assert_eq!(&steps[..4], &[0, 20, 30, 40]);
    assert!(steps.windows(2).all(|w| w[1] >= w[0]));
    assert!(steps.iter().all(|&s| s <= THROTTLE_MAX));
    assert!(steps.contains(&THROTTLE_MAX) || d.last().unwrap().action == Action::GiveUp);
}

#[test]
fn auto_converge_stops_once_throttling_works() {
    let mut rows = intensive_uniform(3);
    // Throttled, the guest's dirty set shrinks until it fits.
    rows.push((61_000, 3700, 30_000, 20_000, 30_000, 16_400.0));
    rows.push((30_000, 1800, 8_000, 6_000, 8_000, 16_400.0));
    rows.push((8_000, 500, 3_000, 2_000, 3_000, 16_400.0));
    let d = run(PolicyKind::AutoConverge, &rows, &[]);
    assert_eq!(d.last().unwrap().action, Action::StopAndCopy);
    assert!(d.last().unwrap().estimate_ms <= 300);
}

#[test]
fn hot_defer_defers_from_the_second_round_on() {
    let d = run(PolicyKind::HotDefer, &converging(), &[]);
    assert!(!d[0].defer_hot, "nothing is hot after the bulk round");
    assert!(d[1].defer_hot);
    assert!(d[1].reason.contains("hot pages held"), "{}", d[1].reason);
    for p in [PolicyKind::Baseline, PolicyKind::Mp, PolicyKind::Fragment] {
        assert!(
            run(p, &converging(), &[]).iter().all(|x| !x.defer_hot),
            "{p}"
        );
    }
}

#[test]
fn fragments_freeze_when_their_dirty_set_stops_shrinking_and_thaw_when_it_halves() {
    let rows = intensive_uniform(6);
    // Fragment 0 is hot (stays ~2000), fragment 1 cools, 2 is clean,
    // 3 stays hot then cools down.
    let frags = vec![
        vec![2000, 1500, 0, 2000],
        vec![2000, 700, 0, 1900],
        vec![1990, 300, 0, 1950],
        vec![2000, 100, 0, 900],
        vec![2000, 50, 0, 300],
        vec![2000, 20, 0, 200],
    ];
    let d = run(PolicyKind::Fragment, &rows, &frags);
    assert_eq!(
        d[0].frozen,
        vec![false; 4],
        "no history after the bulk round"
    );
    assert_eq!(d[1].frozen, vec![true, false, false, true]);
    assert_eq!(d[2].frozen, vec![true, false, false, true]);
    // Fragment 3 fell from 1900 (frozen at) to 900: thawed.
    assert_eq!(d[3].frozen, vec![true, false, false, false]);
    assert_eq!(d[5].frozen, vec![true, false, false, false]);
    for p in [PolicyKind::Baseline, PolicyKind::HotDefer, PolicyKind::Mp] {
        let d = run(p, &rows, &frags);
        assert!(d.iter().all(|x| x.frozen.iter().all(|f| !f)), "{p}");
    }
}

#[test]
fn adaptive_stops_early_when_it_can_and_throttles_only_when_it_cannot() {
    // Hot-set guest: early stop within the cap, no throttle.
    let rows: Vec<Row> = vec![
        (65_536, 4000, 24_000, 0, 24_000, 16_384.0),
        (4_000, 300, 20_000, 15_000, 20_000, 16_000.0),
    ];
    let d = run(PolicyKind::Adaptive, &rows, &[]);
    assert_eq!(d.last().unwrap().action, Action::StopAndCopy);
    assert!(d.iter().all(|x| x.throttle_pct == 0));
    // Uniform 3x guest: the estimate stays over the cap, so it throttles,
    // straight to the level that halves the dirty rate against the link:
    // 61,000 pages in 3.8 s is 16,053/s against 16,300/s sent, so 50%.
    let d = run(PolicyKind::Adaptive, &intensive_uniform(6), &[]);
    assert_eq!(d[1].throttle_pct, 50, "{d:?}");
    // Auto-converge ramps instead.
    let a = run(PolicyKind::AutoConverge, &intensive_uniform(6), &[]);
    assert_eq!(a[1].throttle_pct, THROTTLE_FIRST);
    // Its "hot set" is all of memory: holding it back would only alternate
    // empty and full rounds, so adaptive does not (hot-defer alone does).
    assert!(!d[1].defer_hot);
    assert!(run(PolicyKind::HotDefer, &intensive_uniform(6), &[])[1].defer_hot);
}

#[test]
fn adaptive_holds_a_small_hot_set_and_small_frozen_fragments_only() {
    // A 10% hot set (6,500 of 65,536 pages) found in both syncs: held
    // (0.4 s at the rate, within half the 1.5 s cap).
    let rows: Vec<Row> = vec![
        (65_536, 4000, 14_800, 0, 14_800, 16_384.0),
        (14_800, 900, 8_200, 6_500, 8_200, 16_000.0),
    ];
    let frags = vec![vec![6_000, 5_000, 3_800], vec![6_000, 1_000, 1_200]];
    let d = run(PolicyKind::Adaptive, &rows, &frags);
    assert!(d[1].defer_hot, "{:?}", d[1]);
    // Fragment 0 converged at 6,000 pages: holding it with the hot set
    // (12,500 pages, 0.78 s) would pass half the cap, so it iterates.
    assert_eq!(d[1].frozen, vec![false; 3], "{:?}", d[1]);
    // With a smaller converged fragment, both are held.
    let frags = vec![vec![2_000, 5_000, 3_800], vec![2_000, 1_000, 1_200]];
    let d = run(PolicyKind::Adaptive, &rows, &frags);
    assert_eq!(d[1].frozen, vec![true, false, false], "{:?}", d[1]);
    assert!(d[1].defer_hot);
}

#[test]
fn every_policy_gives_up_at_rounds_max() {
    let mut p = Policy::new(
        PolicyKind::Adaptive,
        Limits {
            rounds_max: 3,
            ..limits()
        },
        1,
    );
    let mut last = None;
    for round in 1..=3 {
        let s = RoundStats {
            round,
            elapsed_ms: round as u64 * 100,
            round_ms: 100,
            sent_pages: 1_000_000,
            rate_pages_s: 10_000.0,
            dirty_pages: 1_000_000,
            hot_pages: 0,
            pending_pages: 1_000_000,
            throttle_pct: 0,
            mem_pages: 1 << 20,
        };
        last = Some(p.decide(&s, &[0]));
    }
    assert_eq!(last.unwrap().action, Action::GiveUp);
}

#[test]
fn the_estimate_counts_every_pending_page() {
    let s = RoundStats {
        pending_pages: 16_384,
        rate_pages_s: 16_384.0,
        ..RoundStats::default()
    };
    assert_eq!(s.estimate_ms(), 1000 + SWITCHOVER_OVERHEAD_MS);
    let z = RoundStats::default();
    assert_eq!(z.estimate_ms(), SWITCHOVER_OVERHEAD_MS);
}

/// A baseline run recorded by `ferry-bench policies` (see the file's
/// `source`): its rounds as the engine measured them.
fn recorded(name: &str) -> Vec<RoundStats> {
    let text = match name {
        "uniform-3x" => include_str!("traces/uniform-3x.json"),
        "hot90-1.5x" => include_str!("traces/hot90-1.5x.json"),
        "hot50-1x" => include_str!("traces/hot50-1x.json"),
        other => panic!("no trace {other}"),
    };
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let mem_pages = v["mem_pages"].as_u64().unwrap();
    v["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["decision"].as_str().unwrap().starts_with("final round"))
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap();
            RoundStats {
                round: n("round") as u32,
                elapsed_ms: n("elapsed_ms"),
                round_ms: n("ms"),
                sent_pages: n("pages"),
                rate_pages_s: n("rate_pages_s") as f64,
                dirty_pages: n("dirty_after"),
                hot_pages: n("hot"),
                pending_pages: n("pending"),
                throttle_pct: n("throttle_pct") as u8,
                mem_pages,
            }
        })
        .collect()
}

/// Replays a recorded trace open-loop: the decisions a policy makes on the
/// same measurements, up to its first stop or give-up.
fn replay(kind: PolicyKind, trace: &[RoundStats]) -> Vec<Decision> {
    let limits = Limits {
        time_max_ms: 20_000,
        ..limits()
    };
    let mut p = Policy::new(kind, limits, 0);
    let mut out = Vec::new();
    for s in trace {
        let d = p.decide(s, &[]);
        let end = d.action != Action::Iterate;
        out.push(d);
        if end {
            break;
        }
    }
    out
}

#[test]
fn recorded_uniform_3x_baseline_gives_up_and_adaptive_throttles_at_once() {
    let t = recorded("uniform-3x");
    let base = replay(PolicyKind::Baseline, &t);
    // As recorded: iterate every round, give up at the 20 s limit.
    assert_eq!(base.len(), t.len());
    assert_eq!(base.last().unwrap().action, Action::GiveUp);
    assert!(t.last().unwrap().elapsed_ms >= 20_000);
    // mp alone cannot stop: ~3.6 s of pending pages is over the cap.
    assert_eq!(
        replay(PolicyKind::Mp, &t).last().unwrap().action,
        Action::GiveUp
    );
    let a = replay(PolicyKind::Adaptive, &t);
    assert_eq!(a[0].action, Action::Iterate);
    assert!(a[1].throttle_pct >= 40, "{:?}", a[1]);
    assert_eq!(a[1].class, "memory-intensive");
    // Its "hot set" is nearly all of memory: nothing is held.
    assert!(a.iter().all(|d| !d.defer_hot));
    let ac = replay(PolicyKind::AutoConverge, &t);
    assert_eq!(ac[1].throttle_pct, THROTTLE_FIRST);
}

#[test]
fn recorded_hot_set_runs_stop_early_under_mp_and_adaptive() {
    for (name, base_rounds) in [("hot90-1.5x", 26), ("hot50-1x", 9)] {
        let t = recorded(name);
        let base = replay(PolicyKind::Baseline, &t);
        // As recorded: baseline iterates until a round happens to fit 300 ms.
        assert_eq!(base.len(), base_rounds, "{name}");
        assert_eq!(base.last().unwrap().action, Action::StopAndCopy, "{name}");
        for kind in [PolicyKind::Mp, PolicyKind::Adaptive] {
            let d = replay(kind, &t);
            let last = d.last().unwrap();
            assert_eq!(last.action, Action::StopAndCopy, "{name} {kind}");
            // At most half of baseline's rounds (4 of 26, 5 of 9 here).
            assert!(
                d.len() * 2 <= base.len() + 1,
                "{name} {kind}: {} rounds",
                d.len()
            );
            assert!(last.estimate_ms <= 1500, "{name} {kind}: {last:?}");
        }
    }
}

/// The 1x, 50%-hot guest of `ferry-bench policies` at 48 MiB/s (12,288
/// pages/s), as measured: its pending set shrinks by a third a round, which
/// takes 3.4 more rounds to reach the budget from ~1.35 s.
fn slowly_converging() -> Vec<Row> {
    vec![
        (53_225, 4302, 25_961, 0, 25_961, 12_369.0),
        (25_961, 2117, 16_554, 9_405, 16_554, 12_314.0),
        (16_554, 1350, 11_958, 5_731, 11_958, 12_286.0),
        (11_958, 979, 9_426, 3_825, 9_426, 12_266.0),
    ]
}

#[test]
fn rounds_to_fit_projects_the_last_shrink() {
    let at = |pending: u64| RoundStats {
        round: 2,
        rate_pages_s: 1000.0,
        pending_pages: pending,
        ..RoundStats::default()
    };
    // 1000 pages = ~1 s, halving each round: about 2 rounds to 300 ms.
    let n = rounds_to_fit(2000, &at(1000), 300);
    assert!((1.5..2.0).contains(&n), "{n}");
    assert_eq!(rounds_to_fit(900, &at(1000), 300), f64::INFINITY);
    assert_eq!(rounds_to_fit(2000, &at(200), 300), 0.0);
    assert_eq!(rounds_to_fit(2000, &at(0), 300), 0.0);
}

#[test]
fn a_slowly_converging_guest_stops_early_within_the_cap() {
    let d = run(PolicyKind::Adaptive, &slowly_converging(), &[]);
    // After the first dirty round: ~1.35 s pending, 3.4 rounds from the
    // budget: memory-intensive, and 1.35 s fits 3/4 of the 2 s cap.
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d[1].class, "memory-intensive");
    assert_eq!(d[1].action, Action::StopAndCopy, "{}", d[1].reason);
    // Baseline classifies alike but iterates on.
    let b = run(PolicyKind::Baseline, &slowly_converging(), &[]);
    assert_eq!(b.len(), 4);
    assert!(b.iter().all(|x| x.action == Action::Iterate));
    // A guest that halves its pending set each round is left to converge.
    let c = run(PolicyKind::Adaptive, &converging(), &[]);
    assert!(c.iter().all(|x| x.class == "converging"), "{c:?}");
}
