//! What a starting node does before it serves as a member.
//!
//! In order: a list kept on disk wins (a restart). Otherwise the node asks the formed nodes
//! that gossip shows for their list ([`on_members_answer`]): it rejoins, forms as a late
//! founder, or asks to join. With no formed node to answer, it forms a new cluster once
//! `bootstrap_expect` nodes are up ([`form_new`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::control::MemberList;

/// A node that gossip shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub cluster: SocketAddr,
    /// It belongs to a formed cluster (it knows the member list).
    pub formed: bool,
    pub zone: Option<String>,
}

/// What to do with the list a formed node answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The list names this node and no node has joined or left since the cluster formed:
    /// it is a founder that was late to form (or lost its data before any change). It forms
    /// as one (the list as epoch 0), creating the groups it is first replica of, unless they
    /// exist; otherwise nobody would create them.
    FormAsFounder(MemberList),
    /// The list names this node: it lost its data; replicas catch up from their leaders.
    Rejoin(MemberList),
    /// The list does not name this node: ask to be added.
    AskToJoin,
}

/// See [`Found`]. Epoch 1 is the formation list as the member-list group holds it.
pub fn on_members_answer(me: &str, list: MemberList) -> Found {
    if !list.names.iter().any(|n| n == me) {
        return Found::AskToJoin;
    }
    if list.epoch <= 1 {
        return Found::FormAsFounder(MemberList { epoch: 0, ..list });
    }
    Found::Rejoin(list)
}

/// The formed nodes to ask for the member list, in gossip's order.
pub fn formed_peers(peers: &[Peer]) -> impl Iterator<Item = &Peer> {
    peers.iter().filter(|p| p.formed)
}

/// No new cluster forms yet: too few nodes are up, or a formed cluster is in view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub have: Vec<String>,
    pub expect: usize,
    /// The formed nodes gossip shows: a cluster exists, so this node joins it (however
    /// long its join is refused) and never forms a second one beside it.
    pub formed: Vec<String>,
}

/// The list a new cluster forms with once `expect` nodes (this one included) are up: all
/// of them, sorted, with `rf` capped by their number, and their zones. `my_addr` and
/// `my_zone` are this node's (gossip does not list this node). Never while a formed node
/// is in view: a node whose join was refused for the moment (its leader busy, its gossip
/// not yet known there) would otherwise form a second cluster with the others it sees.
pub fn form_new(
    me: &str,
    (my_addr, my_zone): (SocketAddr, Option<&str>),
    peers: &[Peer],
    expect: usize,
    rf: usize,
) -> Result<MemberList, Waiting> {
    let mut by_name: BTreeMap<&str, SocketAddr> =
        peers.iter().map(|p| (p.name.as_str(), p.cluster)).collect();
    by_name.insert(me, my_addr);
    let mut zones: BTreeMap<String, String> = peers
        .iter()
        .filter_map(|p| Some((p.name.clone(), p.zone.clone()?)))
        .collect();
    if let Some(z) = my_zone {
        zones.insert(me.to_string(), z.to_string());
    }
    let names: Vec<String> = by_name.keys().map(|n| n.to_string()).collect();
    let formed: Vec<String> = formed_peers(peers).map(|p| p.name.clone()).collect();
    if names.len() < expect.max(1) || !formed.is_empty() {
        return Err(Waiting {
            have: names,
            expect: expect.max(1),
            formed,
        });
    }
    Ok(MemberList {
        replication_factor: rf.min(names.len()),
        addrs: by_name.values().copied().collect(),
        names,
        epoch: 0,
        cluster: None,
        zones,
    })
}

/// Whether this node creates a group whose first replica (or first member, for the
/// member-list group) is `first`: only in a cluster that forms with this list, and only
/// the first. A node given a partition in a running cluster waits to be added to it.
pub fn creates_group(me: &str, list: &MemberList, first: Option<&str>) -> bool {
    list.is_formation() && first == Some(me)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str], epoch: u64) -> MemberList {
        MemberList {
            names: names.iter().map(|s| s.to_string()).collect(),
            replication_factor: 3,
            addrs: Vec::new(),
            epoch,
            cluster: None,
            zones: Default::default(),
        }
    }

    fn peer(name: &str, port: u16, formed: bool) -> Peer {
        Peer {
            name: name.into(),
            cluster: SocketAddr::from(([127, 0, 0, 1], port)),
            formed,
            zone: Some(format!("z{}", port % 2)),
        }
    }

    /// Regression: a founder that started after the others had formed found the list naming
    /// it, took it for a rejoin, and waited to be added to groups nobody had created. A list
    /// unchanged since formation makes it form as a founder.
    #[test]
    fn a_founder_late_to_form_forms_as_one() {
        let answer = list(&["a", "b", "c"], 1);
        assert_eq!(
            on_members_answer("c", answer.clone()),
            Found::FormAsFounder(MemberList { epoch: 0, ..answer })
        );
        let created = MemberList {
            epoch: 0,
            ..list(&["c", "d"], 1)
        };
        assert!(creates_group("c", &created, Some("c")));
    }

    #[test]
    fn a_member_after_a_change_rejoins_and_a_stranger_asks_to_join() {
        let changed = list(&["a", "b", "c"], 4);
        assert_eq!(
            on_members_answer("b", changed.clone()),
            Found::Rejoin(changed.clone())
        );
        assert_eq!(on_members_answer("d", changed), Found::AskToJoin);
    }

    #[test]
    fn a_new_cluster_forms_once_enough_nodes_are_up() {
        let peers = [peer("b", 2, false), peer("c", 3, false)];
        let me = SocketAddr::from(([127, 0, 0, 1], 1));
        let w = form_new("a", (me, None), &peers[..1], 3, 3).unwrap_err();
        assert_eq!((w.have, w.expect), (vec!["a".into(), "b".into()], 3));
        let l = form_new("a", (me, Some("z9")), &peers, 3, 5).unwrap();
        assert_eq!(l.names, ["a", "b", "c"]);
        assert_eq!(l.replication_factor, 3, "rf is capped by the node count");
        assert_eq!(l.addrs, [me, peers[0].cluster, peers[1].cluster]);
        assert!(l.is_formation());
        let zones: Vec<(&str, &str)> = l
            .zones
            .iter()
            .map(|(n, z)| (n.as_str(), z.as_str()))
            .collect();
        assert_eq!(zones, [("a", "z9"), ("b", "z0"), ("c", "z1")]);
        // A single node forms alone; bootstrap_expect 0 counts as 1.
        assert_eq!(form_new("a", (me, None), &[], 0, 3).unwrap().names, ["a"]);
    }

    #[test]
    fn no_second_cluster_forms_beside_a_formed_one() {
        // Regression: a node whose join was refused for the moment (the member list's
        // leader did not know its gossip yet) went on to form a cluster of its own with
        // the members it saw, then took itself for decommissioned.
        let me = SocketAddr::from(([127, 0, 0, 1], 1));
        let peers = [peer("b", 2, true), peer("c", 3, false), peer("d", 4, false)];
        let w = form_new("a", (me, None), &peers, 3, 3).unwrap_err();
        assert_eq!(w.formed, ["b"]);
        assert_eq!(w.have, ["a", "b", "c", "d"]);
        let unformed = [peer("c", 3, false), peer("d", 4, false)];
        assert!(form_new("a", (me, None), &unformed, 3, 3).is_ok());
    }

    #[test]
    fn only_the_first_replica_of_a_forming_cluster_creates_a_group() {
        let forming = list(&["a", "b"], 0);
        assert!(creates_group("a", &forming, Some("a")));
        assert!(!creates_group("b", &forming, Some("a")));
        assert!(!creates_group("a", &list(&["a", "b"], 3), Some("a")));
        assert!(!creates_group("a", &forming, None));
    }

    #[test]
    fn only_formed_peers_are_asked() {
        let peers = [peer("a", 1, false), peer("b", 2, true)];
        let asked: Vec<&str> = formed_peers(&peers).map(|p| p.name.as_str()).collect();
        assert_eq!(asked, ["b"]);
    }
}
