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
    /// The handler slot for a message of this topic with `event_type`, if any route matches.
    pub fn route(&self, event_type: Option<&str>) -> Option<usize> {
        self.routes
            .iter()
            .find(|(wanted, _)| wanted.as_deref().is_none_or(|w| Some(w) == event_type))
            .map(|(_, handler)| *handler)
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
        assert_eq!(r.for_topic("events.x").route(Some("A")), Some(0));
        assert_eq!(r.for_topic("events.x").route(Some("B")), Some(1));
        assert_eq!(r.for_topic("events.x").route(None), Some(1));
        assert_eq!(r.for_topic("other").route(Some("A")), None);
        let unknown = Router::new(&routes, |h| (h == "h0").then_some(0));
        assert_eq!(
            unknown.err().as_deref(),
            Some("h1"),
            "the name no handler has"
        );
    }
}
