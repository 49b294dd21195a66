//! The egress policy: which addresses webhooks and notifications may reach.
//!
//! Chatbot owners write webhook URLs, and the daemon calls them from inside the
//! operator's network. Without a policy one tenant could call the admin API on
//! loopback, a cloud metadata service (169.254.169.254) or any private service, so
//! every outgoing request goes through [`Egress`]:
//! - a URL whose host is a literal address is checked before anything is sent (the
//!   HTTP client connects to a literal address without asking a resolver);
//! - a host name is resolved by [`Resolver`], which checks every address and hands the
//!   connector only those that pass: the address checked is the address connected to,
//!   and no second lookup can answer differently (DNS rebinding);
//! - redirects are not followed, so a public receiver cannot bounce a request inward;
//! - no proxy from the environment is used: the address connected to would be the
//!   proxy's, and checking it would say nothing about where the request goes.
//!
//! Refused unless `egress.allow` lists them: loopback, private (RFC 1918, and the old
//! IPv6 site-local), unique-local, link-local, shared address space (CGNAT),
//! unspecified, multicast, broadcast and reserved addresses, also when written inside
//! an IPv6 address (IPv4-mapped and -compatible, NAT64, 6to4). Refused whatever
//! `allow` says: `egress.deny` and the daemon's own listeners.
//!
//! `host:port` entries of `allow` hold for that port only. The resolver is not told the
//! port of the request it resolves for, so each port that such an entry (or one of the
//! daemon's listeners) names gets a client of its own whose resolver knows it; every
//! other port shares one client, for which no port-bound rule can apply.

use crate::telemetry::metrics as m;
use crate::workflow::{Step, ValidationError, WorkflowSpec};
use ipnet::IpNet;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A kind of address that is refused unless allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Loopback,
    Private,
    UniqueLocal,
    LinkLocal,
    SharedAddressSpace,
    Unspecified,
    Multicast,
    Broadcast,
    Reserved,
}

impl Class {
    pub const ALL: [Class; 9] = [
        Class::Loopback,
        Class::Private,
        Class::UniqueLocal,
        Class::LinkLocal,
        Class::SharedAddressSpace,
        Class::Unspecified,
        Class::Multicast,
        Class::Broadcast,
        Class::Reserved,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Class::Loopback => "loopback",
            Class::Private => "private",
            Class::UniqueLocal => "unique_local",
            Class::LinkLocal => "link_local",
            Class::SharedAddressSpace => "shared_address_space",
            Class::Unspecified => "unspecified",
            Class::Multicast => "multicast",
            Class::Broadcast => "broadcast",
            Class::Reserved => "reserved",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Class::Loopback => "a loopback address",
            Class::Private => "a private address",
            Class::UniqueLocal => "a unique-local address",
            Class::LinkLocal => "a link-local address",
            Class::SharedAddressSpace => "a shared (carrier-grade NAT) address",
            Class::Unspecified => "an unspecified address",
            Class::Multicast => "a multicast address",
            Class::Broadcast => "the broadcast address",
            Class::Reserved => "a reserved address",
        }
    }
}

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// A default class, with the network that matched.
    Class(Class, IpNet),
    /// An `egress.deny` entry.
    Denied(IpNet),
    /// One of this daemon's listeners.
    OwnListener(SocketAddr),
}

impl Rule {
    /// The `rule` label of `botflow_egress_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Rule::Class(c, _) => c.label(),
            Rule::Denied(_) => "deny",
            Rule::OwnListener(_) => "own_listener",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Class(c, net) => write!(f, "{} ({net})", c.describe()),
            Rule::Denied(net) => write!(f, "listed in egress.deny ({net})"),
            Rule::OwnListener(addr) => write!(f, "one of this daemon's own listeners ({addr})"),
        }
    }
}

/// A request the policy refused: the host as the URL wrote it, the address it is (or
/// resolved to), the port, and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub host: String,
    pub addr: IpAddr,
    pub port: u16,
    pub rule: Rule,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("egress refused: ")?;
        let literal = self.host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok();
        if literal {
            write!(f, "{}", self.addr)?;
        } else {
            write!(f, "{} resolves to {}", self.host, self.addr)?;
        }
        match &self.rule {
            Rule::Class(..) => write!(f, ", {}; list it in egress.allow to call it", self.rule),
            Rule::Denied(_) => write!(f, ", which is {}", self.rule),
            Rule::OwnListener(_) => write!(f, " port {}, {}", self.port, self.rule),
        }
    }
}

impl std::error::Error for Refusal {}

/// The host part of an `allow` entry that names one port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TargetHost {
    Addr(IpAddr),
    /// Lower case, without a trailing dot.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Allow {
    Net(IpNet),
    Target { host: TargetHost, port: u16 },
}

/// A CIDR, or a single address (a network of one).
fn parse_net(s: &str) -> Option<IpNet> {
    IpNet::from_str(s).ok().or_else(|| IpAddr::from_str(s).ok().map(IpNet::from)).map(|n| n.trunc())
}

fn parse_allow(entry: &str) -> Result<Allow, String> {
    let s = entry.trim();
    if let Some(net) = parse_net(s) {
        return Ok(Allow::Net(net));
    }
    if let Ok(addr) = SocketAddr::from_str(s) {
        if addr.port() == 0 {
            return Err(format!("{entry:?}: the port must be within 1..65535"));
        }
        return Ok(Allow::Target { host: TargetHost::Addr(canonical(addr.ip())), port: addr.port() });
    }
    let shape = || {
        format!(
            "{entry:?} is not a CIDR (10.1.2.0/24), an address (10.1.2.3) or a host:port (hooks.internal:8443, 10.1.2.3:8080)"
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(shape)?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(shape)?;
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid_name {
        return Err(shape());
    }
    Ok(Allow::Target { host: TargetHost::Name(host), port })
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are the IPv4 address they carry.
fn canonical(addr: IpAddr) -> IpAddr {
    addr.to_canonical()
}

/// The default classes, IPv4 and IPv6, most specific first where they nest.
fn classes() -> &'static [(Class, IpNet)] {
    static TABLE: OnceLock<Vec<(Class, IpNet)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        [
            (Class::Unspecified, "0.0.0.0/8"),
            (Class::Loopback, "127.0.0.0/8"),
            (Class::Private, "10.0.0.0/8"),
            (Class::Private, "172.16.0.0/12"),
            (Class::Private, "192.168.0.0/16"),
            (Class::SharedAddressSpace, "100.64.0.0/10"),
            (Class::LinkLocal, "169.254.0.0/16"),
            // IETF protocol assignments (some clouds answer metadata here) and the
            // benchmarking networks: neither is reachable on the internet.
            (Class::Reserved, "192.0.0.0/24"),
            (Class::Reserved, "198.18.0.0/15"),
            (Class::Multicast, "224.0.0.0/4"),
            // Before 240.0.0.0/4, which holds it.
            (Class::Broadcast, "255.255.255.255/32"),
            (Class::Reserved, "240.0.0.0/4"),
            (Class::Unspecified, "::/128"),
            (Class::Loopback, "::1/128"),
            (Class::UniqueLocal, "fc00::/7"),
            (Class::LinkLocal, "fe80::/10"),
            // Site-local, deprecated but still routed inside some networks.
            (Class::Private, "fec0::/10"),
            (Class::Multicast, "ff00::/8"),
            // Local-use NAT64 (RFC 8215): its prefixes are the network's own choice.
            (Class::Reserved, "64:ff9b:1::/48"),
            // Teredo: tunnelled to an IPv4 host the address does not plainly name.
            (Class::Reserved, "2001::/32"),
        ]
        .into_iter()
        .map(|(c, n)| (c, n.parse().expect("a valid network")))
        .collect()
    })
}

/// The IPv4 address an IPv6 address carries where the network would deliver it to
/// that IPv4 host: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), the
/// well-known NAT64 prefix (`64:ff9b::/96`) and 6to4 (`2002:aabb:ccdd::/48`).
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let last = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    // `::` and `::1` are IPv6's own unspecified and loopback addresses.
    if s[..6] == [0; 6] && u32::from(last) > 1 {
        return Some(last);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(last);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    None
}

/// The default class of an address, if it has one.
pub fn classify(addr: IpAddr) -> Option<(Class, IpNet)> {
    let find = |addr: IpAddr| classes().iter().find(|(_, n)| n.contains(&addr)).copied();
    match canonical(addr) {
        IpAddr::V4(v4) => find(IpAddr::V4(v4)),
        IpAddr::V6(v6) => find(IpAddr::V6(v6)).or_else(|| embedded_v4(v6).and_then(|v4| find(IpAddr::V4(v4)))),
    }
}

/// True when this machine has `addr` (a socket can be bound to it).
fn is_local(addr: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(addr, 0)).is_ok()
}

/// `egress.allow`, `egress.deny` and the daemon's listeners.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    allow: Vec<Allow>,
    deny: Vec<IpNet>,
    own: Vec<SocketAddr>,
}

impl Policy {
    /// Reads the entries; each problem names its key (`egress.allow[1]`).
    pub fn new(allow: &[String], deny: &[String]) -> Result<Policy, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut policy = Policy::default();
        for (i, entry) in allow.iter().enumerate() {
            match parse_allow(entry) {
                Ok(a) => policy.allow.push(a),
                Err(e) => problems.push((format!("egress.allow[{i}]"), e)),
            }
        }
        for (i, entry) in deny.iter().enumerate() {
            match parse_net(entry.trim()) {
                Some(net) => policy.deny.push(net),
                None => problems.push((
                    format!("egress.deny[{i}]"),
                    format!("{entry:?} is not a CIDR (203.0.113.0/24) or an address (203.0.113.9)"),
                )),
            }
        }
        if problems.is_empty() {
            Ok(policy)
        } else {
            Err(problems)
        }
    }

    /// The addresses the daemon listens on, refused whatever `allow` says.
    pub fn with_own_listeners(mut self, own: impl IntoIterator<Item = SocketAddr>) -> Policy {
        self.own.extend(own.into_iter().map(|a| SocketAddr::new(canonical(a.ip()), a.port())));
        self
    }

    /// This policy, and one more destination allowed: the operator's own notification
    /// channel (`notify.webhook_url`), trusted as the operator wrote it. Only its
    /// client gets this policy: tenants' webhooks to the same place stay refused.
    pub fn trusting(mut self, url: &str) -> Policy {
        if let Ok(parsed) = reqwest::Url::parse(url) {
            let host = match parsed.host() {
                Some(url::Host::Ipv4(a)) => Some(TargetHost::Addr(IpAddr::V4(a))),
                Some(url::Host::Ipv6(a)) => Some(TargetHost::Addr(canonical(IpAddr::V6(a)))),
                Some(url::Host::Domain(d)) => Some(TargetHost::Name(d.trim_end_matches('.').to_ascii_lowercase())),
                None => None,
            };
            if let (Some(host), Some(port)) = (host, parsed.port_or_known_default()) {
                self.allow.push(Allow::Target { host, port });
            }
        }
        self
    }

    /// Ports that a rule names: each gets a client whose resolver knows it.
    fn bound_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .allow
            .iter()
            .filter_map(|a| match a {
                Allow::Target { port, .. } => Some(*port),
                Allow::Net(_) => None,
            })
            .chain(self.own.iter().map(|a| a.port()))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Whether `host` (as the URL writes it) at `addr` may be connected to on `port`.
    /// `None` stands for a port that no `host:port` entry and no listener names.
    pub fn check(&self, host: &str, addr: IpAddr, port: Option<u16>) -> Result<(), Refusal> {
        let ip = canonical(addr);
        let refuse = |rule| Err(Refusal { host: host.to_string(), addr: ip, port: port.unwrap_or(0), rule });
        // What is refused whatever `allow` says is refused in every form the address
        // takes: itself, and the IPv4 address a NAT64 or 6to4 address delivers to.
        let forms: Vec<IpAddr> = match ip {
            IpAddr::V6(v6) => std::iter::once(ip).chain(embedded_v4(v6).map(IpAddr::V4)).collect(),
            IpAddr::V4(_) => vec![ip],
        };
        if let Some(port) = port {
            for own in &self.own {
                let at = |a: &IpAddr| own.ip() == *a || (own.ip().is_unspecified() && is_local(*a));
                if own.port() == port && forms.iter().any(at) {
                    return refuse(Rule::OwnListener(*own));
                }
            }
        }
        if let Some(net) = self.deny.iter().find(|n| forms.iter().any(|a| n.contains(a))) {
            return refuse(Rule::Denied(*net));
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        let allowed = self.allow.iter().any(|a| match a {
            Allow::Net(net) => net.contains(&ip),
            Allow::Target { host: TargetHost::Addr(a), port: p } => Some(*p) == port && *a == ip,
            Allow::Target { host: TargetHost::Name(n), port: p } => Some(*p) == port && *n == name,
        });
        if allowed {
            return Ok(());
        }
        match classify(ip) {
            Some((class, net)) => refuse(Rule::Class(class, net)),
            None => Ok(()),
        }
    }

    /// Checks a URL whose host is a literal address; a host name passes (it is checked
    /// when it is resolved). `Ok(None)` for a URL that does not parse.
    pub fn check_url(&self, url: &str) -> Result<Option<(reqwest::Url, u16)>, Refusal> {
        let Ok(parsed) = reqwest::Url::parse(url) else { return Ok(None) };
        let Some(port) = parsed.port_or_known_default() else { return Ok(None) };
        let addr = match parsed.host() {
            Some(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
            _ => None,
        };
        if let Some(addr) = addr {
            self.check(parsed.host_str().unwrap_or_default(), addr, Some(port))?;
        }
        Ok(Some((parsed, port)))
    }

    /// The addresses of a name that may be connected to; the first refusal when none.
    pub fn filter(&self, host: &str, found: impl IntoIterator<Item = IpAddr>, port: Option<u16>) -> Result<Vec<SocketAddr>, Refusal> {
        let mut passed: Vec<SocketAddr> = Vec::new();
        let mut first_refusal = None;
        for addr in found {
            match self.check(host, addr, port) {
                Ok(()) => {
                    let a = SocketAddr::new(addr, port.unwrap_or(0));
                    if !passed.contains(&a) {
                        passed.push(a);
                    }
                }
                Err(r) => {
                    first_refusal.get_or_insert(r);
                }
            }
        }
        match (passed.is_empty(), first_refusal) {
            (true, Some(r)) => Err(r),
            _ => Ok(passed),
        }
    }

    /// At save: a webhook URL whose host is a literal refused address is refused,
    /// naming the step's field and the rule.
    pub fn check_workflow(&self, spec: &WorkflowSpec) -> Result<(), ValidationError> {
        for (i, step) in spec.steps.iter().enumerate() {
            let Step::Webhook(webhook) = step else { continue };
            // Templates fill only the path, query or fragment (validation says so), so
            // the text before the first one holds the whole scheme, host and port.
            let literal = webhook.url.split("{{").next().unwrap_or_default();
            if let Err(refusal) = self.check_url(literal) {
                return Err(ValidationError::new(format!("steps[{i}].url"), refusal.to_string()));
            }
        }
        Ok(())
    }
}

/// Counts a refusal in `botflow_egress_refused_total{rule}` and logs it.
fn count(refusal: &Refusal) {
    metrics::counter!(m::EGRESS_REFUSED, "rule" => refusal.rule.label()).increment(1);
    tracing::warn!(host = %refusal.host, addr = %refusal.addr, port = refusal.port, rule = refusal.rule.label(), "{refusal}");
}

/// Resolves host names for one client, keeping only the addresses the policy allows.
struct Resolver {
    policy: Arc<Policy>,
    /// The port every request of this client goes to, when a rule names it.
    port: Option<u16>,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let port = self.port;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<IpAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.map(|a| a.ip()).collect();
            match policy.filter(&host, found, port) {
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs),
                Err(refusal) => {
                    count(&refusal);
                    Err(Box::new(refusal) as Box<dyn std::error::Error + Send + Sync>)
                }
            }
        })
    }
}

/// The HTTP clients every webhook and notification goes out through.
#[derive(Clone)]
pub struct Egress {
    policy: Arc<Policy>,
    any_port: reqwest::Client,
    by_port: Arc<HashMap<u16, reqwest::Client>>,
}

impl Egress {
    pub fn new(policy: Policy) -> Result<Egress, reqwest::Error> {
        let policy = Arc::new(policy);
        let client = |port: Option<u16>| {
            reqwest::Client::builder()
                .user_agent(concat!("botflow/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(10))
                // A redirect would resend a signed request, and the event data, to a
                // host the workflow did not name and the policy did not check.
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .dns_resolver(Arc::new(Resolver { policy: policy.clone(), port }))
                .build()
        };
        let by_port = policy.bound_ports().into_iter().map(|p| Ok((p, client(Some(p))?))).collect::<Result<_, reqwest::Error>>()?;
        Ok(Egress { any_port: client(None)?, by_port: Arc::new(by_port), policy })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The client to send a request to `url` with, once a literal address in it passed
    /// the policy. (A URL that does not parse gets a client: sending it fails with the
    /// HTTP client's own error.)
    pub fn client_for(&self, url: &str) -> Result<&reqwest::Client, Refusal> {
        match self.policy.check_url(url) {
            Ok(Some((_, port))) => Ok(self.by_port.get(&port).unwrap_or(&self.any_port)),
            Ok(None) => Ok(&self.any_port),
            Err(refusal) => {
                count(&refusal);
                Err(refusal)
            }
        }
    }
}

/// The refusal behind a failed request, if the policy refused it.
pub fn refusal_of<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refusal>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> Policy {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Policy::new(&s(allow), &s(deny)).unwrap()
    }

    fn rule(p: &Policy, addr: &str, port: Option<u16>) -> Option<String> {
        p.check(addr, addr.parse().unwrap(), port).err().map(|r| r.rule.label().to_string())
    }

    #[test]
    fn every_default_class_is_refused_in_each_of_its_forms() {
        let p = Policy::default();
        for (addr, label) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("::1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("fec0::1", "private"),
            ("fd12:3456::1", "unique_local"),
            ("fc00::1", "unique_local"),
            ("169.254.169.254", "link_local"),
            ("fe80::1", "link_local"),
            ("100.64.0.1", "shared_address_space"),
            ("100.127.255.254", "shared_address_space"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            // IPv4 inside IPv6: mapped, compatible, NAT64 and 6to4.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link_local"),
            ("::10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link_local"),
            ("64:ff9b:1::7f00:1", "reserved"),
            ("192.0.0.192", "reserved"),
            ("198.18.0.1", "reserved"),
            ("2001:0:4136:e378::1", "reserved"),
            ("2002:c0a8:0101::1", "private"),
        ] {
            assert_eq!(rule(&p, addr, Some(80)).as_deref(), Some(label), "{addr}");
        }
        for public in ["93.184.216.34", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:0808:0808::1"] {
            assert_eq!(rule(&p, public, Some(443)), None, "{public}");
        }
    }

    #[test]
    fn allow_entries_open_networks_or_one_port_and_deny_wins() {
        let p = policy(&["10.1.2.0/24", "127.0.0.1:9000", "hooks.internal:8443", "fd00::5"], &["203.0.113.0/24", "10.1.2.9"]);
        assert_eq!(rule(&p, "10.1.2.3", Some(1)), None);
        assert_eq!(rule(&p, "::ffff:10.1.2.3", None), None, "the mapped form of an allowed address");
        assert_eq!(rule(&p, "10.1.3.1", Some(1)).as_deref(), Some("private"));
        assert_eq!(rule(&p, "10.1.2.9", Some(1)).as_deref(), Some("deny"), "deny wins over allow");
        assert_eq!(rule(&p, "203.0.113.7", Some(443)).as_deref(), Some("deny"), "deny refuses public addresses too");
        assert_eq!(rule(&p, "64:ff9b::cb00:7105", Some(443)).as_deref(), Some("deny"), "NAT64 to a denied address");
        assert_eq!(rule(&p, "2002:cb00:7105::1", Some(443)).as_deref(), Some("deny"), "6to4 to a denied address");
        assert_eq!(rule(&p, "127.0.0.1", Some(9000)), None);
        assert_eq!(rule(&p, "127.0.0.1", Some(9001)).as_deref(), Some("loopback"), "another port");
        assert_eq!(rule(&p, "127.0.0.1", None).as_deref(), Some("loopback"), "a port no rule names");
        assert_eq!(rule(&p, "fd00::5", Some(1)), None);
        let addr: IpAddr = "10.9.9.9".parse().unwrap();
        assert!(p.check("Hooks.Internal.", addr, Some(8443)).is_ok(), "a named host on its port, whatever it resolves to");
        assert!(p.check("hooks.internal", addr, Some(443)).is_err());
        assert!(p.check("other.internal", addr, Some(8443)).is_err());
    }

    #[test]
    fn the_daemons_own_listeners_are_refused_even_when_allowed() {
        let own: Vec<SocketAddr> = vec!["127.0.0.1:7070".parse().unwrap(), "0.0.0.0:9464".parse().unwrap()];
        let p = policy(&["127.0.0.0/8", "127.0.0.1:7070"], &[]).with_own_listeners(own);
        assert_eq!(rule(&p, "127.0.0.1", Some(7070)).as_deref(), Some("own_listener"));
        assert_eq!(rule(&p, "127.0.0.1", Some(7071)), None);
        // 0.0.0.0 listens on every address this machine has.
        assert_eq!(rule(&p, "127.0.0.2", Some(9464)).as_deref(), Some("own_listener"));
        assert_eq!(rule(&p, "::ffff:127.0.0.1", Some(9464)).as_deref(), Some("own_listener"));
        assert_eq!(rule(&p, "64:ff9b::7f00:1", Some(7070)).as_deref(), Some("own_listener"), "through NAT64");
        assert_eq!(rule(&p, "93.184.216.34", Some(9464)), None, "not an address of this machine");
        assert_eq!(p.bound_ports(), vec![7070, 9464]);
    }

    #[test]
    fn the_operators_channel_is_trusted_on_its_own_client_only() {
        let own: SocketAddr = "10.0.0.5:7070".parse().unwrap();
        let tenants = Policy::default().with_own_listeners([own]);
        let operator = tenants.clone().trusting("http://alerts.internal:9093/hook");
        let addr: IpAddr = "10.0.0.9".parse().unwrap();
        assert!(operator.check("alerts.internal", addr, Some(9093)).is_ok());
        assert!(tenants.check("alerts.internal", addr, Some(9093)).is_err());
        assert!(operator.check("alerts.internal", addr, Some(9094)).is_err(), "that port only");
        let literal = tenants.clone().trusting("http://10.0.0.5:7070/");
        assert_eq!(literal.check_url("http://10.0.0.5:7070/").unwrap_err().rule.label(), "own_listener", "never a listener");
        assert!(tenants.trusting("http://[::ffff:10.0.0.9]/x").check_url("http://10.0.0.9/").is_ok());
    }

    #[test]
    fn literal_urls_are_checked_with_their_port_and_names_pass_to_the_resolver() {
        let p = policy(&["127.0.0.1:8099"], &[]);
        assert!(p.check_url("http://127.0.0.1:8099/hooks").is_ok());
        let r = p.check_url("http://127.0.0.1/hooks").unwrap_err();
        assert_eq!((r.port, r.rule.label()), (80, "loopback"));
        assert_eq!(r.to_string(), "egress refused: 127.0.0.1, a loopback address (127.0.0.0/8); list it in egress.allow to call it");
        // The URL parser reads these as addresses, and so does the connector.
        for sneaky in ["http://2130706433/", "http://0x7f.1/", "http://127.1/", "http://[::ffff:a9fe:a9fe]/latest/meta-data"] {
            assert!(p.check_url(sneaky).is_err(), "{sneaky}");
        }
        assert!(p.check_url("https://hooks.example/x").is_ok());
        assert!(p.check_url("not a url").unwrap().is_none());
    }

    #[test]
    fn a_name_keeps_only_the_addresses_that_pass() {
        let p = policy(&["127.0.0.1:8099"], &[]);
        let ips = |v: &[&str]| v.iter().map(|s| s.parse::<IpAddr>().unwrap()).collect::<Vec<_>>();
        // The addresses handed to the connector are the ones checked: ::1 is dropped.
        let addrs = p.filter("localhost", ips(&["127.0.0.1", "::1", "127.0.0.1"]), Some(8099)).unwrap();
        assert_eq!(addrs, vec!["127.0.0.1:8099".parse::<SocketAddr>().unwrap()]);
        let r = p.filter("evil.example", ips(&["10.0.0.7", "169.254.169.254"]), None).unwrap_err();
        assert_eq!(r.to_string(), "egress refused: evil.example resolves to 10.0.0.7, a private address (10.0.0.0/8); list it in egress.allow to call it");
        let mixed = p.filter("mixed.example", ips(&["10.0.0.7", "93.184.216.34"]), None).unwrap();
        assert_eq!(mixed, vec!["93.184.216.34:0".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn every_rule_label_is_registered_at_zero_in_the_metrics() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        let mut labels: Vec<&str> = Class::ALL.iter().map(|c| Rule::Class(*c, net).label()).collect();
        labels.push(Rule::Denied(net).label());
        labels.push(Rule::OwnListener("127.0.0.1:1".parse().unwrap()).label());
        assert_eq!(labels, m::EGRESS_RULES);
    }

    #[test]
    fn bad_entries_are_named_by_key() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let problems = Policy::new(&s(&["10.0.0.0/8", "10.0.0.0/33", "hooks:0", "no port", "a..b:80"]), &s(&["hooks.internal:80"])).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["egress.allow[1]", "egress.allow[2]", "egress.allow[3]", "egress.allow[4]", "egress.deny[0]"], "{problems:?}");
        assert!(problems[0].1.contains("is not a CIDR"), "{problems:?}");
    }

    #[test]
    fn a_workflow_with_a_literal_refused_address_is_refused_at_save_naming_the_field() {
        let spec: WorkflowSpec = crate::workflow::parse_one(&serde_json::json!({
            "name": "w", "trigger": {"event": "message.received"},
            "steps": [
                {"id": "ok", "action": "webhook", "url": "https://hooks.example/{{event.id}}"},
                {"id": "meta", "action": "webhook", "url": "http://169.254.169.254/latest/{{event.id}}"}
            ]
        }))
        .unwrap();
        let e = Policy::default().check_workflow(&spec).unwrap_err();
        assert_eq!(e.field, "steps[1].url");
        assert!(e.message.contains("link-local address (169.254.0.0/16)"), "{}", e.message);
        assert!(policy(&["169.254.169.254"], &[]).check_workflow(&spec).is_ok());
    }
}
