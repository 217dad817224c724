//! Routes: (topic glob, optional event type) -> handler, first match wins.

use crate::config::RouteConfig;
use crate::glob::glob_match;

/// Compiled routes.
pub struct Router {
    routes: Vec<(String, Option<String>, usize)>,
}

impl Router {
    /// Routes in configuration order; `handler_index` maps a handler name to its slot, or
    /// to `None` when no handler has that name (the name is returned).
    pub fn new(
        routes: &[RouteConfig],
        handler_index: impl Fn(&str) -> Option<usize>,
    ) -> Result<Self, String> {
        let routes = routes
            .iter()
            .map(|r| {
                let slot = handler_index(&r.handler).ok_or_else(|| r.handler.clone())?;
                Ok((r.topic.clone(), r.event_type.clone(), slot))
            })
            .collect::<Result<_, String>>()?;
        Ok(Router { routes })
    }

    /// The routes whose glob matches `topic`, in order: a partition's worker matches the
    /// globs once instead of for every message.
    pub fn for_topic(&self, topic: &str) -> TopicRoutes {
        TopicRoutes {
            routes: self
                .routes
                .iter()
                .filter(|(glob, _, _)| glob_match(glob, topic))
                .map(|(_, wanted, handler)| (wanted.clone(), *handler))
                .collect(),
        }
    }
}

/// The routes of one topic: (optional event type, handler slot), first match wins.
pub struct TopicRoutes {
    routes: Vec<(Option<String>, usize)>,
}

impl TopicRoutes {
    /// The handler slot for a message of this topic whose event type `event_type` gives,
    /// if any route matches. The type is looked up only when a route before the match
    /// (or the match itself) asks for one.
    pub fn route<'a>(&self, event_type: impl FnOnce() -> Option<&'a str>) -> Option<usize> {
        let mut event_type = Some(event_type);
        let mut known = None;
        self.routes
            .iter()
            .find(|(wanted, _)| match wanted {
                None => true,
                Some(w) => {
                    if let Some(look_up) = event_type.take() {
                        known = look_up();
                    }
                    known == Some(w.as_str())
                }
            })
            .map(|(_, handler)| *handler)
    }

    /// The handler every message of this topic goes to, whatever its event type: the
    /// first route's, when it names no event type.
    pub fn catch_all(&self) -> Option<usize> {
        match self.routes.first() {
            Some((None, handler)) => Some(*handler),
            _ => None,
        }
    }

    /// True when some route of this topic names handler `slot`.
    pub fn names(&self, slot: usize) -> bool {
        self.routes.iter().any(|(_, handler)| *handler == slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_route_wins_and_event_type_filters() {
        let routes = vec![
            RouteConfig {
                topic: "events.*".into(),
                event_type: Some("A".into()),
                handler: "h0".into(),
            },
            RouteConfig {
                topic: "events.*".into(),
                event_type: None,
                handler: "h1".into(),
            },
        ];
        let r = Router::new(&routes, |h| h[1..].parse().ok()).unwrap();
        assert_eq!(r.for_topic("events.x").route(|| Some("A")), Some(0));
        assert_eq!(r.for_topic("events.x").route(|| Some("B")), Some(1));
        assert_eq!(r.for_topic("events.x").route(|| None), Some(1));
        assert_eq!(r.for_topic("other").route(|| Some("A")), None);
        assert_eq!(
            r.for_topic("events.x").catch_all(),
            None,
            "the first route picks a type"
        );
        let unknown = Router::new(&routes, |h| (h == "h0").then_some(0));
        assert_eq!(
            unknown.err().as_deref(),
            Some("h1"),
            "the name no handler has"
        );
    }

    #[test]
    fn the_event_type_is_looked_up_only_when_a_route_asks() {
        let route = |topic: &str, event_type: Option<&str>, handler: &str| RouteConfig {
            topic: topic.into(),
            event_type: event_type.map(Into::into),
            handler: handler.into(),
        };
        let routes = vec![
            route("typed", Some("A"), "h0"),
            route("*", None, "h1"),
            route("*", Some("B"), "h2"),
        ];
        let r = Router::new(&routes, |h| h[1..].parse().ok()).unwrap();
        let untyped = r.for_topic("plain");
        assert_eq!(untyped.catch_all(), Some(1));
        let looked_up = std::cell::Cell::new(0);
        let look_up = || {
            looked_up.set(looked_up.get() + 1);
            Some("B")
        };
        assert_eq!(untyped.route(look_up), Some(1));
        assert_eq!(looked_up.get(), 0, "no route of the topic names a type");
        assert_eq!(r.for_topic("typed").route(look_up), Some(1));
        assert_eq!(looked_up.get(), 1, "looked up once for the typed route");
    }
}
