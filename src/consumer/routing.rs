//! Routes: (topic glob, optional event type) -> handler, first match wins.

use crate::config::RouteConfig;

/// Compiled routes.
pub struct Router {
    routes: Vec<(String, Option<String>, usize)>,
}

impl Router {
    /// Routes in configuration order; `handler_index` maps a handler name to its slot.
    pub fn new(routes: &[RouteConfig], handler_index: impl Fn(&str) -> usize) -> Self {
        Router {
            routes: routes
                .iter()
                .map(|r| {
                    (
                        r.topic.clone(),
                        r.event_type.clone(),
                        handler_index(&r.handler),
                    )
                })
                .collect(),
        }
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
}

/// `*` matches any run of characters (also empty), `?` exactly one; the rest literally.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("events.*", "events.DepositMade"));
        assert!(glob_match("events.*", "events."));
        assert!(!glob_match("events.*", "event.x"));
        assert!(glob_match("*.dlq", "a.b.dlq"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*a*b*", "xxaYYbZ"));
    }

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
        let r = Router::new(&routes, |h| h[1..].parse().unwrap());
        assert_eq!(r.for_topic("events.x").route(Some("A")), Some(0));
        assert_eq!(r.for_topic("events.x").route(Some("B")), Some(1));
        assert_eq!(r.for_topic("events.x").route(None), Some(1));
        assert_eq!(r.for_topic("other").route(Some("A")), None);
    }
}
