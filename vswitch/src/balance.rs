//! Spreading endpoints over packet threads by load.
//!
//! Owns the placement decision only: given the work each endpoint (a TAP
//! queue, the tunnel socket) caused over the last interval and the lane it is
//! on, whether to move endpoints, and where. The forwarder measures and
//! applies. Moving is not free (the lanes register their ports again, and a
//! moved endpoint's packets meet a cold microflow cache), so a placement is
//! only changed for a clear gain.

/// One endpoint's lane and the work it caused over the interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub lane: usize,
    pub work: u64,
}

/// Work a lane must do per interval before relieving it is worth it (about
/// 2,000 frames a second at the forwarder's one-second interval).
pub const MIN_WORK: u64 = 2_000;

/// The lane for every endpoint of `loads` when the placement should change,
/// `None` when it should stay: the busiest lane does within a quarter of its
/// fair share, or too little to matter, or no placement would relieve it by
/// a tenth. Longest work first, each endpoint onto the least loaded lane
/// (its own when that is one of them); idle endpoints stay where they are.
pub fn plan(loads: &[Load], lanes: usize) -> Option<Vec<usize>> {
    if lanes < 2 {
        return None;
    }
    let mut now = vec![0u64; lanes];
    for l in loads {
        now[l.lane % lanes] += l.work;
    }
    let worst = now.iter().copied().max().unwrap_or(0);
    let fair = now.iter().sum::<u64>().div_ceil(lanes as u64);
    if worst < MIN_WORK || worst * 4 <= fair * 5 {
        return None;
    }
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(loads[i].work));
    let mut placed: Vec<usize> = loads.iter().map(|l| l.lane % lanes).collect();
    let mut sum = vec![0u64; lanes];
    for i in order {
        let own = placed[i];
        if loads[i].work == 0 {
            continue;
        }
        let least = sum.iter().copied().min().unwrap_or(0);
        let lane = if sum[own] == least {
            own
        } else {
            sum.iter().position(|&w| w == least).unwrap_or(own)
        };
        placed[i] = lane;
        sum[lane] += loads[i].work;
    }
    let after = sum.iter().copied().max().unwrap_or(0);
    (after * 10 < worst * 9).then_some(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(lane: usize, work: u64) -> Load {
        Load { lane, work }
    }

    #[test]
    fn two_busy_endpoints_on_one_lane_are_split() {
        let loads = [load(0, 50_000), load(0, 40_000), load(1, 100), load(0, 0)];
        let placed = plan(&loads, 2).unwrap();
        assert_ne!(placed[0], placed[1]);
        // The idle endpoint stays put.
        assert_eq!(placed[3], 0);
    }

    #[test]
    fn a_fair_placement_stays() {
        let loads = [load(0, 50_000), load(1, 45_000), load(0, 1_000)];
        assert_eq!(plan(&loads, 2), None);
    }

    #[test]
    fn one_elephant_cannot_be_relieved_and_is_left_alone() {
        // All of lane 0's work is one endpoint: no placement does better.
        let loads = [load(0, 90_000), load(1, 5_000), load(1, 5_000)];
        assert_eq!(plan(&loads, 2), None);
    }

    #[test]
    fn light_traffic_is_never_worth_moving() {
        let loads = [load(0, 900), load(0, 900), load(1, 0)];
        assert_eq!(plan(&loads, 2), None);
    }

    #[test]
    fn the_queues_of_a_busy_pod_spread_over_every_lane() {
        // Four queues of one pod (and a quiet pod), all on lane 0 of 4.
        let loads = [
            load(0, 30_000),
            load(0, 30_000),
            load(0, 30_000),
            load(0, 30_000),
            load(1, 10),
        ];
        let mut placed = plan(&loads, 4).unwrap();
        placed.truncate(4);
        placed.sort();
        assert_eq!(placed, [0, 1, 2, 3]);
    }

    #[test]
    fn one_lane_has_nothing_to_balance() {
        assert_eq!(plan(&[load(0, 1_000_000)], 1), None);
    }
}
