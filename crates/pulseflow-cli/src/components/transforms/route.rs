//! The `route` transform: sends each item to every named output whose jq condition it
//! matches; items no route accepts go to the output `_unmatched` when something reads it (and
//! are filtered otherwise). A jq error counts as "does not match".
//!
//! ```toml
//! [transforms.split]
//! type = "route"
//! inputs = ["orders"]
//! routes.big = ".total > 100"
//! routes.small = ".total <= 100"
//!
//! [sinks.big_orders]
//! type = "file"
//! inputs = ["split.big"]
//! path = "big.ndjson"
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use jaq_json::Val;
use pulseflow::stage::StageKind;
use pulseflow::{Routes, Stream};
use serde::Deserialize;
use toml::Spanned;

use crate::build::BuildContext;
use crate::components::{ComponentType, Declare, Port, Reads, TransformComponent};
use crate::config::{Jq, Problems, ReadContext};

/// The `route` transform type.
pub const TYPE: ComponentType<dyn TransformComponent> = ComponentType::new::<Settings>("route");

/// The output of items no route accepts.
const UNMATCHED: &str = "_unmatched";

/// Its settings table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    routes: BTreeMap<Spanned<String>, Spanned<String>>,
}

impl Declare for Settings {
    type Component = dyn TransformComponent;

    fn check(
        self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<Arc<dyn TransformComponent>> {
        let mut routes = Vec::new();
        let mut ok = true;
        if self.routes.is_empty() {
            problems.add(
                "`routes` is empty",
                Some(cx.span.clone()),
                "no routes",
                None,
            );
        }
        for (route, code) in &self.routes {
            let r = route.get_ref();
            if r == UNMATCHED || r.contains('.') || r.is_empty() {
                problems.add(
                    format!("`{r}` cannot name a route"),
                    Some(route.span()),
                    "reserved or invalid",
                    Some(format!(
                        "`{UNMATCHED}` is the output of items no route accepts"
                    )),
                );
                ok = false;
                continue;
            }
            match cx.jq(code, &format!("{}.routes.{r}", cx.table), problems) {
                Some(jq) => routes.push((r.clone(), jq)),
                None => ok = false,
            }
        }
        ok.then(|| Arc::new(Route { routes }) as Arc<dyn TransformComponent>)
    }
}

/// A checked `route`.
pub struct Route {
    routes: Vec<(String, Jq)>,
}

impl TransformComponent for Route {
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> Vec<(String, Stream<Val>)> {
        let mut r = Routes::new();
        for (name, jq) in &self.routes {
            let program = jq.program.clone();
            // A jq error counts as "does not match": the item goes on to the other routes or
            // to `_unmatched`.
            r = r.route(name.clone(), move |v: &Val| {
                program.test(v).unwrap_or(false)
            });
        }
        let unmatched = cx.is_read(UNMATCHED);
        if unmatched {
            r = r.unmatched(UNMATCHED);
        }
        let mut branches = input.branch(cx.name().to_owned(), r);
        let taken = self
            .routes
            .iter()
            .map(|(name, _)| name.as_str())
            .chain(unmatched.then_some(UNMATCHED))
            .filter_map(|name| Some((name.to_owned(), branches.take(name)?)));
        // The route's policies are its branch stage's: set through any of its outputs (all of
        // them stand for that stage).
        taken
            .enumerate()
            .map(|(i, (name, s))| {
                let s = if i == 0 { cx.with_policies(s, None) } else { s };
                (name, s)
            })
            .collect()
    }

    fn outputs(&self) -> Vec<Port> {
        let mut ports: Vec<Port> = self.routes.iter().map(|(r, _)| Port::named(r)).collect();
        ports.push(Port {
            name: UNMATCHED.into(),
            optional: true,
        });
        ports
    }

    fn stage_kind(&self) -> StageKind {
        StageKind::Branch
    }

    fn reads(&self) -> Reads<'_> {
        Reads::Through {
            programs: self.routes.iter().map(|(_, jq)| &*jq.program).collect(),
            forwards: true,
        }
    }
}
