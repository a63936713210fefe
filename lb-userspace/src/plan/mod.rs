//! From the cluster state to the desired datapath state: [`translate`] (Kubernetes' Service
//! semantics, a pure function) gives the [`desired`] frontends and their backends; [`maglev`]
//! builds the lookup tables new flows choose a backend from; [`render`] shows a plan to people
//! (`lb plan`).

pub mod desired;
pub mod maglev;
pub mod render;
pub mod translate;
