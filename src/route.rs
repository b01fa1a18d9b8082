//! Route planning: a pure function from recipients and their current directory state to
//! deliveries, one per route. No I/O, so it is cheap to test and to explain.

use crate::directory::Resolution;
use crate::types::{Address, RouteName};
use std::collections::BTreeMap;

/// One delivery: the recipients (by index in the envelope) that go to one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The route.
    pub route: RouteName,
    /// Indexes into the message's recipient list.
    pub rcpts: Vec<usize>,
}

/// The result of planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Deliveries in route-name order.
    pub deliveries: Vec<Delivery>,
    /// Recipients with no route now (unknown and `directory.unknown = "reject"`).
    pub unroutable: Vec<usize>,
}

/// Groups `rcpts` (index, address) by the route `resolve` gives each one now.
pub fn plan<'a>(
    rcpts: impl IntoIterator<Item = (usize, &'a Address)>,
    resolve: impl Fn(&Address) -> Resolution,
) -> Plan {
    let mut groups: BTreeMap<RouteName, Vec<usize>> = BTreeMap::new();
    let mut unroutable = Vec::new();
    for (i, addr) in rcpts {
        match resolve(addr) {
            Resolution::Listed(r) | Resolution::Unlisted(r) => groups.entry(r).or_default().push(i),
            Resolution::Reject => unroutable.push(i),
        }
    }
    Plan {
        deliveries: groups
            .into_iter()
            .map(|(route, rcpts)| Delivery { route, rcpts })
            .collect(),
        unroutable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_by_route() {
        let addrs: Vec<Address> = ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
            .iter()
            .map(|s| Address::parse(s, false).unwrap())
            .collect();
        let p = plan(addrs.iter().enumerate(), |a| match a.local() {
            "a" | "c" => Resolution::Listed(RouteName("cloud".into())),
            "b" => Resolution::Unlisted(RouteName("onprem".into())),
            _ => Resolution::Reject,
        });
        assert_eq!(
            p.deliveries,
            vec![
                Delivery {
                    route: RouteName("cloud".into()),
                    rcpts: vec![0, 2]
                },
                Delivery {
                    route: RouteName("onprem".into()),
                    rcpts: vec![1]
                },
            ]
        );
        assert_eq!(p.unroutable, vec![3]);
    }
}
