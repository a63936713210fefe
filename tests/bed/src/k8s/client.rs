//! A blocking Kubernetes client for the tests: the real kube-rs client on a runtime of its
//! own, with create-or-update, status patches, deletions, lists and waits on any
//! k8s-openapi type.

use std::any::TypeId;
use std::fmt::Debug;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The field manager of the tests' server-side applies.
const MANAGER: &str = "lb-tests";

/// A Kubernetes object type the client handles.
pub trait Object:
    kube::Resource<DynamicType = (), Scope: 'static> + Serialize + DeserializeOwned + Clone + Debug
{
}
impl<K> Object for K where
    K: kube::Resource<DynamicType = (), Scope: 'static>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug
{
}

/// A client of one API server (a kubeconfig), with blocking calls.
pub struct Kube {
    // Dropped after the client (declaration order), which needs the runtime to shut down.
    client: kube::Client,
    rt: tokio::runtime::Runtime,
}

impl Kube {
    /// A client from a kubeconfig file.
    pub fn new(kubeconfig: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let client = rt.block_on(async {
            let kc = Kubeconfig::read_from(kubeconfig)?;
            let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", kubeconfig.display()))?;
            anyhow::Ok(kube::Client::try_from(config)?)
        })?;
        Ok(Kube { client, rt })
    }

    /// Runs a future of the client to completion.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The kube-rs client (for calls this wrapper lacks; run them with [`Kube::block_on`]).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    fn api<K: Object>(&self, namespace: Option<&str>) -> Api<DynamicObject> {
        let resource = ApiResource::erase::<K>(&());
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        }
    }

    /// Creates `object`, or updates it to what it says (server-side apply, forced: the test
    /// owns every field it names). Namespaced objects without a namespace go to `default`.
    pub fn apply<K: Object>(&self, object: &K) -> Result<K> {
        let applied = self.apply_json::<K>(serde_json::to_value(object)?)?;
        serde_json::from_value(applied)
            .with_context(|| format!("a {} from the server", K::kind(&())))
    }

    /// [`Kube::apply`] of an object given as JSON (`apiVersion` and `kind` are `K`'s), for
    /// fields K's type lacks (a v1.21 Service's `spec.topologyKeys`); returns what the API
    /// server stored, as JSON.
    pub fn apply_json<K: Object>(&self, mut object: Value) -> Result<Value> {
        let name = object["metadata"]["name"]
            .as_str()
            .context("metadata.name")?
            .to_owned();
        let namespace = namespace_of::<K>(object["metadata"]["namespace"].as_str());
        object["apiVersion"] = K::api_version(&()).into();
        object["kind"] = K::kind(&()).into();
        let api = self.api::<K>(namespace.as_deref());
        let params = PatchParams::apply(MANAGER).force();
        let applied = self
            .rt
            .block_on(api.patch(&name, &params, &Patch::Apply(&object)))
            .with_context(|| format!("apply {} {name}", K::kind(&())))?;
        Ok(serde_json::to_value(applied)?)
    }

    /// Creates `object`; fails if it exists.
    pub fn create<K: Object>(&self, object: &K) -> Result<K> {
        let namespace = namespace_of::<K>(object.meta().namespace.as_deref());
        let value: DynamicObject = serde_json::from_value(serde_json::to_value(object)?)?;
        let api = self.api::<K>(namespace.as_deref());
        let created = self
            .rt
            .block_on(api.create(&PostParams::default(), &value))
            .with_context(|| format!("create {} {:?}", K::kind(&()), object.meta().name))?;
        convert(created)
    }

    /// A JSON merge patch of `name`'s status subresource.
    pub fn patch_status<K: Object>(
        &self,
        namespace: Option<&str>,
        name: &str,
        status: Value,
    ) -> Result<K> {
        let namespace = namespace_of::<K>(namespace);
        let api = self.api::<K>(namespace.as_deref());
        let patch = serde_json::json!({ "status": status });
        let patched = self
            .rt
            .block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .with_context(|| format!("patch the status of {} {name}", K::kind(&())))?;
        convert(patched)
    }

    /// A JSON merge patch of `name`.
    pub fn patch<K: Object>(&self, namespace: Option<&str>, name: &str, patch: Value) -> Result<K> {
        let namespace = namespace_of::<K>(namespace);
        let api = self.api::<K>(namespace.as_deref());
        let patched = self
            .rt
            .block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .with_context(|| format!("patch {} {name}", K::kind(&())))?;
        convert(patched)
    }

    /// Deletes `name` with this grace period (`None`: the object's default); whether it
    /// existed.
    pub fn delete<K: Object>(
        &self,
        namespace: Option<&str>,
        name: &str,
        grace_seconds: Option<u32>,
    ) -> Result<bool> {
        let namespace = namespace_of::<K>(namespace);
        let api = self.api::<K>(namespace.as_deref());
        let params = DeleteParams {
            grace_period_seconds: grace_seconds,
            ..DeleteParams::background()
        };
        match self.rt.block_on(api.delete(name, &params)) {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(e) => Err(e).with_context(|| format!("delete {} {name}", K::kind(&()))),
        }
    }

    /// `name`, if it exists.
    pub fn get<K: Object>(&self, namespace: Option<&str>, name: &str) -> Result<Option<K>> {
        let namespace = namespace_of::<K>(namespace);
        let api = self.api::<K>(namespace.as_deref());
        let got = self
            .rt
            .block_on(api.get_opt(name))
            .with_context(|| format!("get {} {name}", K::kind(&())))?;
        got.map(convert).transpose()
    }

    /// Every object of type `K` (in `namespace`, or in all namespaces).
    pub fn list<K: Object>(&self, namespace: Option<&str>) -> Result<Vec<K>> {
        let api = self.api::<K>(namespace);
        let list = self
            .rt
            .block_on(api.list(&ListParams::default()))
            .with_context(|| format!("list {}", K::plural(&())))?;
        list.items.into_iter().map(convert).collect()
    }

    /// Polls `check` every 100 ms until it returns `Some`, for up to `timeout`; the error
    /// says what was awaited and what `check` last failed with.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Kube) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check(self) {
                Ok(Some(t)) => return Ok(t),
                Ok(None) => String::from("not yet"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}: {last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `default` for namespaced types without a namespace; `None` for cluster-scoped types.
fn namespace_of<K: Object>(namespace: Option<&str>) -> Option<String> {
    let namespaced = TypeId::of::<K::Scope>() == TypeId::of::<NamespaceResourceScope>();
    namespaced.then(|| {
        namespace
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_owned()
    })
}

fn convert<K: Object>(object: DynamicObject) -> Result<K> {
    let value = serde_json::to_value(object)?;
    serde_json::from_value(value).with_context(|| format!("a {} from the server", K::kind(&())))
}
