//! Where each event of a batch stands between sending and settlement, so
//! settlements can hand the writer the acknowledged head of the batch: a
//! head is settled with one range delete, while a scattered set (Kafka
//! acknowledges partitions in any order) costs the writer a lookup and a
//! delete per row.

/// One event's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unsent,
    Sent,
    /// Acknowledged by Kafka, not yet handed to a settlement.
    Acked,
    /// Handed to a settlement.
    Handed,
    /// Failed (judged after the batch).
    Failed,
}

/// The states of one batch's events, by index in the batch.
#[derive(Debug)]
pub(super) struct Acks {
    state: Vec<State>,
    /// Every event before this one is handed (or failed).
    head: usize,
    /// One past the last event sent.
    sent_upto: usize,
    /// Acknowledged and not yet handed.
    waiting: usize,
}

impl Acks {
    pub fn new(events: usize) -> Self {
        Self {
            state: vec![State::Unsent; events],
            head: 0,
            sent_upto: 0,
            waiting: 0,
        }
    }

    pub fn sent(&mut self, i: usize) {
        self.state[i] = State::Sent;
        self.sent_upto = self.sent_upto.max(i + 1);
    }

    pub fn acked(&mut self, i: usize) {
        if self.state[i] == State::Sent {
            self.state[i] = State::Acked;
            self.waiting += 1;
        }
    }

    pub fn failed(&mut self, i: usize) {
        if self.state[i] == State::Acked {
            self.waiting -= 1;
        }
        self.state[i] = State::Failed;
    }

    /// Acknowledged events not yet handed to a settlement.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Hands over the acknowledged events at the head of the batch: those
    /// with every event before them acknowledged too (a failure ends the
    /// head for this batch: its row stays buffered before the rest).
    pub fn take_head(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        while let Some(s) = self.state.get(self.head) {
            match s {
                State::Acked => {
                    out.push(self.head);
                    self.state[self.head] = State::Handed;
                }
                State::Handed => {}
                State::Unsent | State::Sent | State::Failed => break,
            }
            self.head += 1;
        }
        self.waiting -= out.len();
        out
    }

    /// Hands over every acknowledged event not yet handed, in batch order.
    pub fn take_all(&mut self) -> Vec<usize> {
        let mut out = self.take_head();
        let head_len = out.len();
        for i in self.head..self.sent_upto {
            if self.state[i] == State::Acked {
                out.push(i);
                self.state[i] = State::Handed;
            }
        }
        self.waiting -= out.len() - head_len;
        out
    }

    /// Events sent and not yet reported, in batch order.
    pub fn outstanding(&self) -> impl Iterator<Item = usize> + '_ {
        (self.head..self.sent_upto).filter(|&i| self.state[i] == State::Sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(n: usize) -> Acks {
        let mut a = Acks::new(n);
        (0..n).for_each(|i| a.sent(i));
        a
    }

    #[test]
    fn the_head_stops_at_the_first_event_not_acknowledged() {
        let mut a = sent(6);
        for i in [1, 2, 4] {
            a.acked(i);
        }
        assert_eq!(a.take_head(), Vec::<usize>::new(), "event 0 is still out");
        assert_eq!(a.waiting(), 3);
        a.acked(0);
        assert_eq!(a.take_head(), vec![0, 1, 2]);
        assert_eq!(a.waiting(), 1, "event 4 waits behind event 3");
        assert_eq!(a.outstanding().collect::<Vec<_>>(), vec![3, 5]);
        a.acked(3);
        a.acked(5);
        assert_eq!(a.take_head(), vec![3, 4, 5]);
        assert_eq!((a.waiting(), a.take_all()), (0, vec![]));
    }

    #[test]
    fn take_all_hands_over_scattered_acknowledgements_once() {
        let mut a = sent(8);
        for i in [0, 2, 3, 6] {
            a.acked(i);
        }
        assert_eq!(a.take_all(), vec![0, 2, 3, 6]);
        assert_eq!(a.waiting(), 0);
        a.acked(1);
        assert_eq!(a.take_head(), vec![1], "2 and 3 were handed already");
        assert_eq!(a.outstanding().collect::<Vec<_>>(), vec![4, 5, 7]);
        a.acked(7);
        a.acked(2); // a repeated report changes nothing
        assert_eq!(a.waiting(), 1);
        assert_eq!(a.take_all(), vec![7]);
    }

    #[test]
    fn a_failure_ends_the_head_and_unsent_events_are_not_outstanding() {
        let mut a = Acks::new(5);
        for i in 0..3 {
            a.sent(i);
        }
        a.failed(0);
        a.acked(1);
        a.acked(2);
        assert_eq!(a.take_head(), Vec::<usize>::new());
        assert_eq!(a.take_all(), vec![1, 2]);
        assert_eq!(a.outstanding().count(), 0, "3 and 4 were never sent");
        assert_eq!(a.waiting(), 0);
    }
}
