//! The network: one namespace per host, each joined to a bridge in the run's own namespace
//! by a veth pair, so every host has a real link that can be cut, blackholed or slowed.
//!
//! Faults act on those links: a partition is a blackhole route inside the cut-off host's
//! namespace (its packets to the far side are dropped: connections stall, new ones time
//! out, as on a broken WAN link; this kernel has no netfilter tools installed and no
//! `sch_netem`), a slow link is a token bucket (`tc … tbf`) on the host's end of its veth.
//! Everything is made with Debian's `ip` and `tc` (iproute2) and removed by [`Net::drop`].

use crate::procs::{self, run_to_end, As};
use anyhow::Context;
use std::net::Ipv4Addr;
use std::process::Command;

/// The prefix of every namespace and link this tool makes (and removes at start when an
/// earlier run was killed before it could clean up).
pub const PREFIX: &str = "cxw-";
/// The bridge in the run's own namespace.
pub const BRIDGE: &str = "cxw-br";
/// The run's own address on the bridge (load generators, next hops, the poller).
pub const HOST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// A host of the topology: a namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its name (`pg1`, `mx2`…).
    pub name: String,
    /// Its namespace (`cxw-pg1`).
    pub ns: String,
    /// Its address.
    pub ip: Ipv4Addr,
}

impl Host {
    /// The root end of its veth pair (also `PREFIX` + name: at most 15 bytes).
    fn link(&self) -> String {
        format!("{PREFIX}{}", self.name)
    }
}

/// The namespaces and links of a run; removed when dropped.
pub struct Net {
    /// Every host, in the order made.
    pub hosts: Vec<Host>,
}

/// Runs `ip`/`tc` (Debian package iproute2) with `args`; an error names the command and
/// what it printed.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_to_end(cmd, &format!("{program} {}", args.join(" ")))
}

/// Like [`sh`] inside the namespace `ns`.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = procs::in_ns(ns, &As::Root, program);
    cmd.args(args);
    run_to_end(cmd, &format!("{program} {} in {ns}", args.join(" ")))
}

/// Removes what an earlier run left: namespaces and links named with [`PREFIX`].
pub fn sweep() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(PREFIX) {
                let _ = sh("ip", &["netns", "del", name]);
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `7: cxw-pg1@if6: <…>`
            let Some(name) = line.split(':').nth(1).map(str::trim) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name.starts_with(PREFIX) {
                let _ = sh("ip", &["link", "del", name]);
            }
        }
    }
}

impl Net {
    /// Makes the bridge with [`HOST`] and one namespace per `(name, last octet)`.
    pub fn build(hosts: &[(&str, u8)]) -> anyhow::Result<Net> {
        sweep();
        sh("ip", &["link", "add", BRIDGE, "type", "bridge"])
            .context("network namespaces need root (CI runs as root)")?;
        let mut net = Net { hosts: Vec::new() };
        sh("ip", &["addr", "add", &format!("{HOST}/24"), "dev", BRIDGE])?;
        sh("ip", &["link", "set", BRIDGE, "up"])?;
        for (name, octet) in hosts {
            let host = Host {
                name: name.to_string(),
                ns: format!("{PREFIX}{name}"),
                ip: Ipv4Addr::new(10, 77, 0, *octet),
            };
            let link = host.link();
            sh("ip", &["netns", "add", &host.ns])?;
            net.hosts.push(host.clone());
            sh(
                "ip",
                &[
                    "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &host.ns,
                ],
            )?;
            sh("ip", &["link", "set", &link, "master", BRIDGE])?;
            sh("ip", &["link", "set", &link, "up"])?;
            in_ns(
                &host.ns,
                "ip",
                &["addr", "add", &format!("{}/24", host.ip), "dev", "eth0"],
            )?;
            in_ns(&host.ns, "ip", &["link", "set", "eth0", "up"])?;
            in_ns(&host.ns, "ip", &["link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the topology"))
    }

    /// Cuts `from` off from `to` (packets from `from` to `to` are dropped in `from`'s
    /// namespace, and `to`'s answers to `from` in `to`'s: both ways, as a broken link).
    pub fn partition(&self, from: &str, to: &str) -> anyhow::Result<()> {
        let (a, b) = (self.host(from), self.host(to));
        in_ns(
            &a.ns,
            "ip",
            &["route", "add", "blackhole", &format!("{}/32", b.ip)],
        )?;
        in_ns(
            &b.ns,
            "ip",
            &["route", "add", "blackhole", &format!("{}/32", a.ip)],
        )
    }

    /// Ends [`Net::partition`].
    pub fn heal(&self, from: &str, to: &str) -> anyhow::Result<()> {
        let (a, b) = (self.host(from), self.host(to));
        let r1 = in_ns(
            &a.ns,
            "ip",
            &["route", "del", "blackhole", &format!("{}/32", b.ip)],
        );
        let r2 = in_ns(
            &b.ns,
            "ip",
            &["route", "del", "blackhole", &format!("{}/32", a.ip)],
        );
        r1.and(r2)
    }

    /// Slows `name`'s link to `kbit` kbit/s each way it sends (a token bucket on its end
    /// of the veth pair; a queue of 200 ms, then drops).
    pub fn slow(&self, name: &str, kbit: u32) -> anyhow::Result<()> {
        let h = self.host(name);
        let rate = format!("{kbit}kbit");
        in_ns(
            &h.ns,
            "tc",
            &[
                "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", &rate, "burst", "32kbit",
                "latency", "200ms",
            ],
        )
    }

    /// Ends [`Net::slow`].
    pub fn unslow(&self, name: &str) -> anyhow::Result<()> {
        let h = self.host(name);
        in_ns(&h.ns, "tc", &["qdisc", "del", "dev", "eth0", "root"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = sh("ip", &["netns", "del", &h.ns]);
            let _ = sh("ip", &["link", "del", &h.link()]);
        }
        let _ = sh("ip", &["link", "del", BRIDGE]);
    }
}
