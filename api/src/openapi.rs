//! The OpenAPI document's frame: title, the bearer security scheme, tags and
//! the schemas no handler names directly. The paths come from the handlers'
//! `#[utoipa::path]` annotations as `routes()` registers them.

use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::error::ErrorCode;
use crate::wire::{BundleUpload, ErrorBody, ErrorDetail};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "troupe",
        description = "A provisioning workflow engine: actions made of ordered steps, run by plugins from signed bundles. \
                       Every endpoint but /v1/health and /openapi.json needs `Authorization: Bearer <token>` with the scope each operation names \
                       (every scope includes read; admin includes all). Errors are `{\"error\": {\"code\", \"message\"}}` with a code from the ErrorCode schema."
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, BundleUpload)),
    tags(
        (name = "actions", description = "Submit, watch and cancel actions"),
        (name = "bundles", description = "Signed step bundles and the keys trusted to sign them"),
        (name = "admin", description = "API tokens, secrets and the audit log"),
        (name = "targets", description = "Target records: what the operator keeps about each target, read by step templates as {{target.KEY}}"),
        (name = "goons", description = "Faults injected on purpose in a test deployment (`troupe serve --goons`)"),
        (name = "server", description = "Liveness, server details, and the servers sharing the database"),
    )
)]
pub(crate) struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("troupe_<id>_<secret>")
                    .description(Some(
                        "An API token from `troupe tokens create`; scopes: read, submit, operate, admin",
                    ))
                    .build(),
            ),
        );
    }
}
