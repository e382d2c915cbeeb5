//! The UI, shared by server rendering and hydration.
//!
//! Two pages: `/`, the dashboard, and `/devices/{id}`, one device with its
//! charts. Links between them (and between a device page's ranges) are
//! ordinary page loads (`rel="external"` keeps the router from taking them
//! over): each page is rendered by the server with its data, and follows
//! its own event stream once hydrated.

mod api;
mod changes;
mod chart;
mod dashboard;
mod device;
mod limits;
mod live;

use crate::model::DeviceId;
pub use changes::change_text;
use dashboard::Dashboard;
#[cfg(feature = "ssr")]
pub use dashboard::SparkCache;
use device::DevicePage;
use leptos::prelude::*;
use leptos_meta::{MetaTags, Stylesheet, Title, provide_meta_context};
use leptos_router::components::{Route, Router, Routes};
use leptos_router::path;

/// The HTML document around the app; rendered on the server only.
pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <meta name="viewport" content="width=device-width, initial-scale=1" />
                <meta name="color-scheme" content="light dark" />
                <link rel="icon" href="/favicon.svg" type="image/svg+xml" />
                <AutoReload options=options.clone() />
                <HydrationScripts options />
                <MetaTags />
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    view! {
        <Stylesheet id="leptos" href="/pkg/telltale.css" />
        <Router>
            <Routes fallback=|| view! { <NotFound what="There is no such page." /> }>
                <Route path=path!("/") view=DashboardPage />
                <Route path=path!("/devices/:id") view=DevicePage />
            </Routes>
        </Router>
    }
}

#[component]
fn DashboardPage() -> impl IntoView {
    view! { <Dashboard /> }
}

/// Reads what the page asked for renders from on a blocking thread, before
/// the render, and hands it to the page among the request's extensions: the
/// history reads block, and a render runs on an async worker that also
/// writes the event streams. (Blocking the render itself in place, with
/// `block_in_place`, loses Leptos' reactive owner halfway through it.)
#[cfg(feature = "ssr")]
pub async fn read_ahead(
    axum::extract::State(state): axum::extract::State<crate::server::AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::extract::Query;
    use tokio::task::spawn_blocking;
    let hub = state.hub.clone();
    let path = request.uri().path();
    let operator = state.auth.session(request.headers(), &hub).is_some();
    let read = if path == "/" {
        let sparks = state.sparks.clone();
        let viewer = state.auth.viewer_session(request.headers(), &hub).is_some();
        spawn_blocking(move || one(dashboard::read(&hub, &sparks, operator, viewer)))
    } else if let Some(id) = path.strip_prefix("/devices/") {
        let id = DeviceId::parse(id).ok();
        let query = Query::<Vec<(String, String)>>::try_from_uri(request.uri());
        let range = query
            .iter()
            .flat_map(|q| q.iter())
            .find(|(k, _)| k == "range");
        let range = device::Range::parse(range.map(|(_, v)| v.as_str()));
        spawn_blocking(move || one(device::read(&hub, id, range, operator)))
    } else {
        return next.run(request).await;
    };
    // Should the read fail, the page reads for itself.
    if let Ok(extensions) = read.await {
        request.extensions_mut().extend(extensions);
    }
    next.run(request).await
}

/// Extensions holding only `value`.
#[cfg(feature = "ssr")]
fn one<T: Clone + Send + Sync + 'static>(value: T) -> axum::http::Extensions {
    let mut extensions = axum::http::Extensions::new();
    extensions.insert(value);
    extensions
}

/// The address of a device's page.
pub fn device_href(id: &DeviceId) -> String {
    format!("/devices/{id}")
}

/// A page for what is not there; the server answers it with 404.
#[component]
fn NotFound(#[prop(into)] what: String) -> impl IntoView {
    #[cfg(feature = "ssr")]
    if let Some(response) = use_context::<leptos_axum::ResponseOptions>() {
        response.set_status(axum::http::StatusCode::NOT_FOUND);
    }
    view! {
        <Title text="Not found · Telltale" />
        <header class="top">
            <h1>"Telltale"</h1>
        </header>
        <main class="not-found" data-testid="not-found">
            <h2>"Not found"</h2>
            <p>{what}</p>
            <p>
                <a href="/" rel="external">
                    "← All devices"
                </a>
            </p>
        </main>
    }
}
