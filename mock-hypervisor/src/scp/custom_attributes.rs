//! Custom attributes and their bindings to resources (base images, servers).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::json;

use super::ScpPlatform;
use super::envelope::{ScpError, ScpQuery, ScpResult, ok, paged, parse_body};
use super::model::{Binding, CustomAttribute, ScpInventory};
use crate::error::Error;
use crate::ids::new_uuid;

/// `GET /janus/20190725/custom-attributes` (filters: `id`, `name`,
/// `resource_type`).
pub async fn list(State(scp): State<Arc<ScpPlatform>>, ScpQuery(q): ScpQuery) -> ScpResult {
    let items: Vec<CustomAttribute> = scp.inv.read(|doc| {
        doc.custom_attributes
            .values()
            .filter(|a| q.get("id").is_none_or(|v| &a.id == v))
            .filter(|a| q.get("name").is_none_or(|v| &a.name == v))
            .filter(|a| q.get("resource_type").is_none_or(|v| &a.resource_type == v))
            .cloned()
            .collect()
    });
    paged(&q, items)
}

fn default_resource_type() -> String {
    "base_image".into()
}

#[derive(Debug, Deserialize)]
struct CreateAttribute {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default = "default_resource_type")]
    resource_type: String,
}

fn check_resource_type(t: &str) -> Result<(), Error> {
    match t {
        "base_image" | "server" => Ok(()),
        other => Err(Error::Invalid(format!(
            "resource_type must be base_image or server, not {other}"
        ))),
    }
}

/// `POST /janus/20190725/custom-attributes`
pub async fn create(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> ScpResult {
    let req: CreateAttribute = parse_body(&body)?;
    if req.name.trim().is_empty() {
        return Err(ScpError::invalid("name must not be empty"));
    }
    check_resource_type(&req.resource_type)?;
    let id = scp.inv.update(|doc| {
        if doc.custom_attributes.values().any(|a| a.name == req.name) {
            return Err(Error::Conflict(format!(
                "custom attribute {} already exists",
                req.name
            )));
        }
        let id = new_uuid();
        doc.custom_attributes.insert(
            id.clone(),
            CustomAttribute {
                id: id.clone(),
                name: req.name.clone(),
                description: req.description.clone(),
                resource_type: req.resource_type.clone(),
            },
        );
        Ok(id)
    })?;
    ok(json!({"id": id}))
}

/// `GET /janus/20190725/custom-attributes/bindings` (filters: `resource_id`,
/// `resource_type`, `custom_attribute_id`). Each binding carries the
/// attribute's name and description.
pub async fn list_bindings(
    State(scp): State<Arc<ScpPlatform>>,
    ScpQuery(q): ScpQuery,
) -> ScpResult {
    let items: Vec<serde_json::Value> = scp.inv.read(|doc| {
        doc.bindings
            .values()
            .filter(|b| q.get("resource_id").is_none_or(|v| &b.resource_id == v))
            .filter(|b| q.get("resource_type").is_none_or(|v| &b.resource_type == v))
            .filter(|b| {
                q.get("custom_attribute_id")
                    .is_none_or(|v| &b.custom_attribute_id == v)
            })
            .map(|b| {
                let attr = doc.custom_attributes.get(&b.custom_attribute_id);
                let mut v = serde_json::to_value(b).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("custom_attribute_name".into(), json!(attr.map(|a| &a.name)));
                    o.insert(
                        "custom_attribute_description".into(),
                        json!(attr.map(|a| &a.description)),
                    );
                }
                v
            })
            .collect()
    });
    paged(&q, items)
}

/// Body of one binding.
#[derive(Debug, Deserialize)]
struct NewBinding {
    custom_attribute_id: String,
    #[serde(default = "default_resource_type")]
    resource_type: String,
    resource_id: String,
    #[serde(default)]
    value: String,
}

fn validate(doc: &ScpInventory, b: &NewBinding) -> Result<(), Error> {
    check_resource_type(&b.resource_type)?;
    if !doc.custom_attributes.contains_key(&b.custom_attribute_id) {
        return Err(Error::not_found("custom attribute", &b.custom_attribute_id));
    }
    let exists = match b.resource_type.as_str() {
        "base_image" => doc.base_images.contains_key(&b.resource_id),
        _ => doc.servers.contains_key(&b.resource_id),
    };
    if !exists {
        return Err(Error::not_found("resource", &b.resource_id));
    }
    if doc
        .bindings
        .values()
        .any(|x| x.custom_attribute_id == b.custom_attribute_id && x.resource_id == b.resource_id)
    {
        return Err(Error::Conflict(format!(
            "custom attribute {} is already bound to {}",
            b.custom_attribute_id, b.resource_id
        )));
    }
    Ok(())
}

fn insert(doc: &mut ScpInventory, b: NewBinding) -> String {
    let id = new_uuid();
    doc.bindings.insert(
        id.clone(),
        Binding {
            id: id.clone(),
            custom_attribute_id: b.custom_attribute_id,
            resource_type: b.resource_type,
            resource_id: b.resource_id,
            value: b.value,
        },
    );
    id
}

/// `POST /janus/20190725/custom-attributes/bindings`
pub async fn create_binding(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> ScpResult {
    let req: NewBinding = parse_body(&body)?;
    let id = scp.inv.update(|doc| {
        validate(doc, &req)?;
        Ok(insert(doc, req))
    })?;
    ok(json!({"id": id}))
}

#[derive(Debug, Deserialize)]
struct BulkBindings {
    bindings: Vec<NewBinding>,
}

/// `POST /janus/20190725/custom-attributes/bindings/actions/bulk-create`:
/// all or nothing.
pub async fn bulk_create_bindings(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> ScpResult {
    let req: BulkBindings = parse_body(&body)?;
    let ids = scp.inv.update(|doc| {
        for (i, b) in req.bindings.iter().enumerate() {
            validate(doc, b)?;
            if req.bindings[..i].iter().any(|x| {
                x.custom_attribute_id == b.custom_attribute_id && x.resource_id == b.resource_id
            }) {
                return Err(Error::Invalid(format!("bindings[{i}] is a duplicate")));
            }
        }
        Ok(req
            .bindings
            .into_iter()
            .map(|b| insert(doc, b))
            .collect::<Vec<_>>())
    })?;
    ok(json!({"ids": ids}))
}
