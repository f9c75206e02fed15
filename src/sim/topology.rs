//! Which components the simulator models and which depend on which.

use std::collections::BTreeMap;

/// Name of the one component of the default topology.
pub const DEFAULT_COMPONENT: &str = "charter";

/// Longest component name accepted.
const MAX_NAME: usize = 63;

/// Why a topology was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// No component at all.
    #[error("at least one component is required")]
    Empty,
    /// A name that is not 1..=63 of `A-Z a-z 0-9 _ . -`.
    #[error("invalid component name `{0}`: use 1 to 63 letters, digits, `_`, `.` or `-`")]
    InvalidName(String),
    /// The same component named twice.
    #[error("component `{0}` is listed twice")]
    Duplicate(String),
    /// A dependency names a component that is not in the list.
    #[error("unknown component `{name}` in a dependency (components: {known})")]
    Unknown {
        /// The unknown name.
        name: String,
        /// The components, comma-separated.
        known: String,
    },
    /// A component said to depend on itself.
    #[error("component `{0}` cannot depend on itself")]
    SelfDependency(String),
    /// A dependency spec that is not `DEPENDENT=UPSTREAM[,UPSTREAM...]`.
    #[error("malformed dependency `{0}`: expected DEPENDENT=UPSTREAM[,UPSTREAM...]")]
    Malformed(String),
}

/// The simulated components, in order (the first is the default one that
/// requests without a `component` address), and for each the components it
/// depends on (its upstreams).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    components: Vec<String>,
    depends_on: BTreeMap<String, Vec<String>>,
}

impl Default for Topology {
    /// One component, [`DEFAULT_COMPONENT`], without dependencies.
    fn default() -> Self {
        Topology {
            components: vec![DEFAULT_COMPONENT.to_string()],
            depends_on: BTreeMap::new(),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl Topology {
    /// Components `names` (the first is the default one), no dependencies.
    pub fn new<S: AsRef<str>>(names: &[S]) -> Result<Self, TopologyError> {
        let mut components: Vec<String> = Vec::with_capacity(names.len());
        for n in names {
            let n = n.as_ref().trim();
            if !valid_name(n) {
                return Err(TopologyError::InvalidName(n.to_string()));
            }
            if components.iter().any(|c| c == n) {
                return Err(TopologyError::Duplicate(n.to_string()));
            }
            components.push(n.to_string());
        }
        if components.is_empty() {
            return Err(TopologyError::Empty);
        }
        Ok(Topology {
            components,
            depends_on: BTreeMap::new(),
        })
    }

    /// Adds that `dependent` depends on each of `upstreams` (repeats are
    /// merged).
    pub fn with_dependency<S: AsRef<str>>(
        mut self,
        dependent: &str,
        upstreams: &[S],
    ) -> Result<Self, TopologyError> {
        let dependent = dependent.trim();
        self.check_known(dependent)?;
        for u in upstreams {
            let u = u.as_ref().trim();
            self.check_known(u)?;
            if u == dependent {
                return Err(TopologyError::SelfDependency(u.to_string()));
            }
            let list = self.depends_on.entry(dependent.to_string()).or_default();
            if !list.iter().any(|x| x == u) {
                list.push(u.to_string());
            }
        }
        Ok(self)
    }

    /// Builds a topology from the command line: `components` is
    /// comma-separated (`gateway,charter,ledger`), each of `depends_on` is
    /// `DEPENDENT=UPSTREAM[,UPSTREAM...]` (`gateway=charter,ledger`).
    pub fn parse<S: AsRef<str>>(components: &str, depends_on: &[S]) -> Result<Self, TopologyError> {
        let names: Vec<&str> = components
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let mut topology = Topology::new(&names)?;
        for spec in depends_on {
            let spec = spec.as_ref();
            let (dependent, upstreams) = spec
                .split_once('=')
                .ok_or_else(|| TopologyError::Malformed(spec.to_string()))?;
            let ups: Vec<&str> = upstreams
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            if dependent.trim().is_empty() || ups.is_empty() {
                return Err(TopologyError::Malformed(spec.to_string()));
            }
            topology = topology.with_dependency(dependent, &ups)?;
        }
        Ok(topology)
    }

    fn check_known(&self, name: &str) -> Result<(), TopologyError> {
        if self.components.iter().any(|c| c == name) {
            Ok(())
        } else {
            Err(TopologyError::Unknown {
                name: name.to_string(),
                known: self.components.join(", "),
            })
        }
    }

    /// The components, the default one first.
    pub fn components(&self) -> &[String] {
        &self.components
    }

    /// The default component (the first).
    pub fn default_component(&self) -> &str {
        // Never empty: `new` refuses an empty list, `default` has one.
        &self.components[0]
    }

    /// The components `name` depends on (empty for an unknown name).
    pub fn upstreams(&self, name: &str) -> &[String] {
        self.depends_on.get(name).map_or(&[], Vec::as_slice)
    }

    /// The components that depend on `name` directly, in component order.
    pub fn dependents(&self, name: &str) -> Vec<&str> {
        self.components
            .iter()
            .filter(|c| self.upstreams(c).iter().any(|u| u == name))
            .map(String::as_str)
            .collect()
    }

    /// Every dependency, dependent → upstreams.
    pub fn dependencies(&self) -> &BTreeMap<String, Vec<String>> {
        &self.depends_on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_one_charter() {
        let t = Topology::default();
        assert_eq!(t.components(), ["charter"]);
        assert_eq!(t.default_component(), "charter");
        assert!(t.dependencies().is_empty());
    }

    #[test]
    fn parses_components_and_dependencies() {
        let t = Topology::parse(
            "gateway, charter,ledger",
            &[
                "gateway=charter,ledger",
                "ledger=charter",
                "gateway=charter",
            ],
        )
        .unwrap();
        assert_eq!(t.components(), ["gateway", "charter", "ledger"]);
        assert_eq!(t.default_component(), "gateway");
        assert_eq!(t.upstreams("gateway"), ["charter", "ledger"]);
        assert_eq!(t.upstreams("ledger"), ["charter"]);
        assert!(t.upstreams("charter").is_empty());
        assert_eq!(t.dependents("charter"), ["gateway", "ledger"]);
        assert_eq!(t.dependents("ledger"), ["gateway"]);
        assert!(t.dependents("gateway").is_empty());
    }

    #[test]
    fn refuses_bad_topologies() {
        assert_eq!(
            Topology::parse("", &[] as &[&str]),
            Err(TopologyError::Empty)
        );
        assert_eq!(
            Topology::parse("a,a", &[] as &[&str]),
            Err(TopologyError::Duplicate("a".into()))
        );
        assert_eq!(
            Topology::parse("a,b c", &[] as &[&str]),
            Err(TopologyError::InvalidName("b c".into()))
        );
        assert!(matches!(
            Topology::parse("a,b", &["a=c"]),
            Err(TopologyError::Unknown { name, known }) if name == "c" && known == "a, b"
        ));
        assert_eq!(
            Topology::parse("a,b", &["a=a"]),
            Err(TopologyError::SelfDependency("a".into()))
        );
        for bad in ["a", "a=", "=b"] {
            assert_eq!(
                Topology::parse("a,b", &[bad]),
                Err(TopologyError::Malformed(bad.into()))
            );
        }
    }
}
