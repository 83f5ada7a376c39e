//! The checker on hand-made histories: a clean one is valid, and each anomaly is reported
//! as itself.

use warbler_chaos::checker::{check, Check};
use warbler_chaos::history::{Event, Outcome};

/// Builds histories: publishes, connections and deliveries with a running clock.
#[derive(Default)]
struct H {
    t: f64,
    events: Vec<Event>,
}

impl H {
    fn tick(&mut self) -> f64 {
        self.t += 10.0;
        self.t
    }

    fn publish(&mut self, user: &str, id: &str, outcome: Outcome) -> &mut Self {
        let t = self.tick();
        self.events.push(Event::Publish {
            t,
            end: t + 5.0,
            publisher: 0,
            node: 0,
            user: user.into(),
            id: id.into(),
            attempt: 1,
            outcome,
        });
        self
    }

    fn ok(&mut self, user: &str, id: &str, seq: u64) -> &mut Self {
        self.publish(user, id, Outcome::Ok { seq })
    }

    fn connect(&mut self, device: &str, cursor: u64) -> &mut Self {
        let t = self.tick();
        self.events.push(Event::Connect {
            t,
            device: device.into(),
            user: user_of(device),
            node: 0,
            cursor,
        });
        self
    }

    fn disconnect(&mut self, device: &str) -> &mut Self {
        let t = self.tick();
        self.events.push(Event::Disconnect {
            t,
            device: device.into(),
            why: "planned".into(),
        });
        self
    }

    fn deliver(&mut self, device: &str, seq: u64, id: &str) -> &mut Self {
        let t = self.tick();
        self.events.push(Event::Deliver {
            t,
            device: device.into(),
            user: user_of(device),
            seq,
            id: id.into(),
            body_ok: true,
        });
        self
    }

    fn check(&self) -> Check {
        check(&self.events)
    }
}

fn user_of(device: &str) -> String {
    device.split('/').next().unwrap().to_string()
}

/// u0 gets a, b, c as seqs 1..3; both devices read all three.
fn clean() -> H {
    let mut h = H::default();
    h.ok("u0", "a", 1).ok("u0", "b", 2).ok("u0", "c", 3);
    for d in ["u0/d0", "u0/d1"] {
        h.connect(d, 0)
            .deliver(d, 1, "a")
            .deliver(d, 2, "b")
            .deliver(d, 3, "c");
    }
    h
}

/// Only the named counters may be non-zero.
fn only(c: &Check, nonzero: &[&str]) {
    let counts = [
        ("lost", c.lost),
        ("unexpected", c.unexpected),
        ("duplicate_assignments", c.duplicate_assignments),
        ("seq_reuse", c.seq_reuse),
        ("order_violations", c.order_violations),
        ("gaps", c.gaps),
        ("real_time_violations", c.real_time_violations),
        ("send_order_violations", c.send_order_violations),
        ("undrained_devices", c.undrained_devices),
    ];
    for (name, v) in counts {
        assert_eq!(
            v > 0,
            nonzero.contains(&name),
            "{name} = {v}; expected only {nonzero:?} to be non-zero; examples: {:?}",
            c.examples
        );
    }
    assert!(!c.valid || nonzero.is_empty());
    assert!(c.valid || !nonzero.is_empty());
}

#[test]
fn a_clean_history_is_valid() {
    let c = clean().check();
    only(&c, &[]);
    assert!(c.valid);
    assert_eq!(
        (
            c.attempted,
            c.acknowledged,
            c.delivered,
            c.deliveries,
            c.devices
        ),
        (3, 3, 3, 6, 2)
    );
    assert!(c.latency.p50 > 0.0 && c.latency.max >= c.latency.p99);
}

#[test]
fn redelivery_after_a_reconnect_is_not_an_anomaly() {
    // The device got 1 and 2, its ack of 2 was lost with the connection: the server
    // resends 2 (cursor 1).
    let mut h = H::default();
    h.ok("u0", "a", 1).ok("u0", "b", 2);
    h.connect("u0/d0", 0)
        .deliver("u0/d0", 1, "a")
        .deliver("u0/d0", 2, "b")
        .disconnect("u0/d0")
        .connect("u0/d0", 1)
        .deliver("u0/d0", 2, "b");
    let c = h.check();
    only(&c, &[]);
    assert_eq!(c.deliveries, 3);
}

#[test]
fn a_lost_message_is_reported() {
    let mut h = clean();
    // d acknowledged as seq 4, never delivered to any device.
    h.ok("u0", "d", 4);
    let c = h.check();
    only(&c, &["lost"]);
    assert_eq!(c.lost, 1);
    assert!(c.examples[0].contains("d was acknowledged as seq 4"));
}

#[test]
fn a_message_one_device_missed_is_lost() {
    let mut h = H::default();
    h.ok("u0", "a", 1).ok("u0", "b", 2);
    h.connect("u0/d0", 0)
        .deliver("u0/d0", 1, "a")
        .deliver("u0/d0", 2, "b");
    h.connect("u0/d1", 0).deliver("u0/d1", 1, "a");
    let c = h.check();
    only(&c, &["lost"]);
    assert_eq!(c.lost, 1);
}

#[test]
fn a_reordering_is_reported() {
    let mut h = H::default();
    h.ok("u0", "a", 1).ok("u0", "b", 2).ok("u0", "c", 3);
    h.connect("u0/d0", 0)
        .deliver("u0/d0", 1, "a")
        .deliver("u0/d0", 3, "c")
        .deliver("u0/d0", 2, "b");
    let c = h.check();
    // 3 where 2 was due is a gap; 2 after 3 is the order violation.
    assert_eq!(c.order_violations, 1, "{:?}", c.examples);
    assert!(!c.valid);
}

#[test]
fn a_repeat_within_one_connection_is_an_order_violation() {
    let mut h = H::default();
    h.ok("u0", "a", 1).ok("u0", "b", 2);
    h.connect("u0/d0", 0)
        .deliver("u0/d0", 1, "a")
        .deliver("u0/d0", 2, "b")
        .deliver("u0/d0", 2, "b");
    let c = h.check();
    only(&c, &["order_violations"]);
}

#[test]
fn a_gap_is_reported() {
    let mut h = H::default();
    h.ok("u0", "a", 1).ok("u0", "b", 2).ok("u0", "c", 3);
    h.connect("u0/d0", 0)
        .deliver("u0/d0", 1, "a")
        .deliver("u0/d0", 3, "c");
    let c = h.check();
    // Seq 2 never reached the device: a gap, and b is lost.
    only(&c, &["gaps", "lost"]);
    assert_eq!(c.gaps, 1);
}

#[test]
fn a_cursor_beyond_what_was_delivered_is_a_gap() {
    let mut h = H::default();
    h.ok("u0", "a", 1).ok("u0", "b", 2).ok("u0", "c", 3);
    h.connect("u0/d0", 0)
        .deliver("u0/d0", 1, "a")
        .disconnect("u0/d0")
        // The server claims the device acked up to 2, though 2 was never sent.
        .connect("u0/d0", 2)
        .deliver("u0/d0", 3, "c");
    let c = h.check();
    only(&c, &["gaps", "lost"]);
}

#[test]
fn a_duplicate_assignment_is_reported() {
    let mut h = clean();
    // A retry of b acknowledged with another seq: one id, two seqs.
    h.ok("u0", "b", 4);
    let c = h.check();
    assert_eq!(c.duplicate_assignments, 1, "{:?}", c.examples);
    assert!(!c.valid);
}

#[test]
fn one_seq_for_two_ids_is_reported() {
    let mut h = H::default();
    // x acknowledged as seq 1, but the stream holds y at seq 1 (a second writer).
    h.ok("u0", "x", 1).ok("u0", "y", 1);
    h.connect("u0/d0", 0).deliver("u0/d0", 1, "y");
    let c = h.check();
    assert_eq!(c.seq_reuse, 1, "{:?}", c.examples);
    assert_eq!(c.lost, 1, "x never arrived");
    assert!(!c.valid);
}

#[test]
fn an_unexpected_delivery_is_reported() {
    let mut h = clean();
    h.connect("u0/d0", 3).deliver("u0/d0", 4, "ghost");
    let c = h.check();
    only(&c, &["unexpected"]);
    assert_eq!(c.unexpected, 1);

    // A message delivered to the wrong user is unexpected too.
    let mut h = clean();
    h.ok("u1", "for-u1", 1);
    h.connect("u1/d0", 0).deliver("u1/d0", 1, "for-u1");
    h.connect("u0/d0", 3).deliver("u0/d0", 4, "for-u1");
    let c = h.check();
    assert_eq!(c.unexpected, 1, "{:?}", c.examples);
}

#[test]
fn a_refused_message_that_arrives_is_unexpected() {
    let mut h = clean();
    h.publish(
        "u0",
        "refused",
        Outcome::Failed {
            code: "bad_request".into(),
        },
    );
    h.connect("u0/d0", 3).deliver("u0/d0", 4, "refused");
    let c = h.check();
    assert_eq!(c.unexpected, 1, "{:?}", c.examples);
}

#[test]
fn an_unknown_outcome_that_was_delivered_is_recovered() {
    let mut h = clean();
    h.publish(
        "u0",
        "maybe",
        Outcome::Unknown {
            why: "timeout".into(),
        },
    );
    h.publish(
        "u0",
        "never",
        Outcome::Unknown {
            why: "timeout".into(),
        },
    );
    for d in ["u0/d0", "u0/d1"] {
        h.connect(d, 3).deliver(d, 4, "maybe");
    }
    let c = h.check();
    only(&c, &[]);
    assert_eq!((c.unknown, c.recovered), (2, 1));
}

#[test]
fn overloaded_refusals_are_counted_and_a_retry_that_lands_is_acknowledged() {
    let mut h = clean();
    let overloaded = || Outcome::Unknown {
        why: "overloaded".into(),
    };
    h.publish("u0", "busy", overloaded())
        .publish("u0", "busy", overloaded())
        .ok("u0", "busy", 4);
    h.publish(
        "u0",
        "late",
        Outcome::Unknown {
            why: "timeout".into(),
        },
    );
    for d in ["u0/d0", "u0/d1"] {
        h.connect(d, 3).deliver(d, 4, "busy");
    }
    let c = h.check();
    only(&c, &[]);
    assert_eq!((c.overloaded, c.acknowledged, c.unknown), (2, 4, 1));
}

#[test]
fn a_later_publish_with_a_lower_seq_breaks_real_time_order() {
    let mut h = H::default();
    // "late" is sent after "early" was acknowledged, yet got the lower seq.
    h.ok("u0", "early", 2).ok("u0", "late", 1);
    h.connect("u0/d0", 0)
        .deliver("u0/d0", 1, "late")
        .deliver("u0/d0", 2, "early");
    let c = h.check();
    only(&c, &["real_time_violations"]);
}

/// Publishes sent together (open loop): all first sent at `t`, answered in `answers` order.
fn in_flight(h: &mut H, publisher: u32, answers: &[(&str, u64)]) {
    let t = h.tick();
    for (i, (id, seq)) in answers.iter().enumerate() {
        h.events.push(Event::Publish {
            t,
            end: t + 1.0 + i as f64,
            publisher,
            node: 0,
            user: "u0".into(),
            id: id.to_string(),
            attempt: 1,
            outcome: Outcome::Ok { seq: *seq },
        });
    }
}

#[test]
fn publishes_in_flight_together_keep_their_send_order() {
    let mut h = H::default();
    // Answered out of order, but each got the seq of its place: allowed.
    in_flight(&mut h, 3, &[("p3-1", 2), ("p3-0", 1), ("p3-2", 3)]);
    // Another publisher's ids interleave with their own order.
    in_flight(&mut h, 4, &[("p4-7", 4), ("p4-9", 5)]);
    h.connect("u0/d0", 0);
    for (seq, id) in ["p3-0", "p3-1", "p3-2", "p4-7", "p4-9"].iter().enumerate() {
        h.deliver("u0/d0", seq as u64 + 1, id);
    }
    only(&h.check(), &[]);
}

#[test]
fn a_publish_that_overtook_one_sent_before_it_is_a_send_order_violation() {
    let mut h = H::default();
    // p3-1 was sent after p3-0 on the same run, both in flight, yet got the lower seq.
    // Real-time order cannot see it: neither was acknowledged before the other was sent.
    in_flight(&mut h, 3, &[("p3-1", 1), ("p3-0", 2)]);
    h.connect("u0/d0", 0)
        .deliver("u0/d0", 1, "p3-1")
        .deliver("u0/d0", 2, "p3-0");
    let c = h.check();
    only(&c, &["send_order_violations"]);
    assert_eq!(c.send_order_violations, 1);
}

#[test]
fn a_device_that_never_finished_its_final_read_is_reported() {
    let mut h = clean();
    h.events.push(Event::Drained {
        t: 1000.0,
        device: "u0/d0".into(),
        user: "u0".into(),
        upto: 5,
        reached: 3,
    });
    let c = h.check();
    only(&c, &["undrained_devices"]);
}

#[test]
fn a_fault_that_stops_acknowledgements_has_a_recovery_time() {
    // Acks every 10 ms for 6 s, none for 2 s from the fault at 6 s, then again.
    let mut events = Vec::new();
    let mut n = 0;
    let mut t = 0.0;
    while t < 12_000.0 {
        if !(6_000.0..8_000.0).contains(&t) {
            events.push(Event::Publish {
                t,
                end: t,
                publisher: 0,
                node: 0,
                user: "u0".into(),
                id: format!("m{n}"),
                attempt: 1,
                outcome: Outcome::Ok { seq: n + 1 },
            });
            n += 1;
        }
        t += 10.0;
    }
    events.push(Event::Fault {
        t: 6_000.0,
        end: 6_000.0,
        action: "kill".into(),
        targets: vec![0],
        detail: "Kill random (n0)".into(),
    });
    let c = check(&events);
    let f = &c.faults[0];
    let recover = f.recover_ms.expect("throughput came back");
    assert!(
        (1_400.0..=2_000.0).contains(&recover),
        "recovered after {recover} ms"
    );
    let stall = f.worst_user_stall_ms.unwrap();
    assert!((1_990.0..=2_010.0).contains(&stall), "stall {stall} ms");
    assert_eq!(c.timeline.len(), 13);
    assert_eq!(c.timeline[3].acked, 100);
    assert_eq!(c.timeline[7].acked, 0);
}
