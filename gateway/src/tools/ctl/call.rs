//! `tetherctl call`: a gRPC call to a service behind an agent, with a JSON request and JSON
//! replies, the message types learnt from the upstream's own server reflection
//! (`grpc.reflection.v1`, or `v1alpha` from servers that serve only that one) through the
//! tunnel. No `.proto` files, no grpcurl needed.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

use crate::tools::ctl::Conn;

/// Where a call goes: the agent, and the agent's service (its default when `None`).
#[derive(Clone, Debug)]
pub struct Route {
    /// `<tenant>/<agent>`.
    pub agent: String,
    /// The agent's service name (`tether-service`).
    pub service: Option<String>,
}

impl Route {
    fn request<T>(
        &self,
        body: T,
        timeout: std::time::Duration,
    ) -> Result<tonic::Request<T>, String> {
        let mut req = tonic::Request::new(body);
        req.metadata_mut().insert(
            "tether-agent",
            MetadataValue::try_from(self.agent.as_str())
                .map_err(|_| format!("agent {:?} is not ASCII", self.agent))?,
        );
        if let Some(s) = &self.service {
            req.metadata_mut().insert(
                "tether-service",
                MetadataValue::try_from(s.as_str())
                    .map_err(|_| format!("service {s:?} is not ASCII"))?,
            );
        }
        req.set_timeout(timeout);
        Ok(req)
    }

    fn describe(&self) -> String {
        match &self.service {
            Some(s) => format!("service {s:?} of agent {}", self.agent),
            None => format!("the default service of agent {}", self.agent),
        }
    }
}

/// Calls `method` (`package.Service/Method`, a leading `/` allowed) with the JSON `data` and
/// prints each reply as JSON, one per line (`pretty`: indented).
pub async fn call(
    channel: Conn,
    route: &Route,
    method: &str,
    data: &str,
    timeout: std::time::Duration,
    pretty: bool,
) -> Result<(), String> {
    let (service, name) = method
        .trim_start_matches('/')
        .rsplit_once('/')
        .or_else(|| method.rsplit_once('.'))
        .ok_or_else(|| {
            format!("method {method:?} is not <package.Service>/<Method>, e.g. tether.demo.v1.Echo/Unary")
        })?;
    let pool = match reflect(&channel, route, service, timeout, REFLECTION_V1).await {
        // Older servers (grpc-java before 1.57, grpc-go before 1.58, grpcio's older releases)
        // serve only the v1alpha service; its messages are v1's, field for field.
        Err(Reflection::Unimplemented) => {
            reflect(&channel, route, service, timeout, REFLECTION_V1ALPHA).await
        }
        other => other,
    }
    .map_err(|e| match e {
        Reflection::Unimplemented => format!(
            "{} does not serve gRPC server reflection (neither grpc.reflection.v1 nor v1alpha), so tetherctl cannot learn its message types; call it with grpcurl and its .proto files (-proto), adding -H 'tether-agent: {}'",
            route.describe(),
            route.agent
        ),
        Reflection::Failed(m) => m,
    })?;
    let svc = pool.get_service_by_name(service).ok_or_else(|| {
        format!(
            "{} does not describe service {service} through reflection",
            route.describe()
        )
    })?;
    let m = svc.methods().find(|m| m.name() == name).ok_or_else(|| {
        let names: Vec<String> = svc.methods().map(|m| m.name().to_owned()).collect();
        format!(
            "service {service} has no method {name}; its methods: {}",
            names.join(", ")
        )
    })?;
    let mut de = serde_json::Deserializer::from_str(data);
    let request = DynamicMessage::deserialize(m.input(), &mut de)
        .and_then(|msg| de.end().map(|()| msg))
        .map_err(|e| {
            format!(
                "--data is not a JSON {} ({}): {e}",
                m.input().full_name(),
                fields(&m.input())
            )
        })?;
    let replies = send(channel, route, &m, request, timeout).await?;
    let mut stream = replies.into_inner();
    while let Some(reply) = stream.message().await.map_err(status)? {
        let text = if pretty {
            serde_json::to_string_pretty(&reply)
        } else {
            serde_json::to_string(&reply)
        }
        .map_err(|e| format!("the reply does not convert to JSON: {e}"))?;
        println!("{text}");
    }
    Ok(())
}

fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// The fields of a message, for a request that does not parse.
fn fields(m: &MessageDescriptor) -> String {
    let f: Vec<String> = m.fields().map(|f| f.json_name().to_owned()).collect();
    if f.is_empty() {
        "no fields: pass {}".into()
    } else {
        format!("fields: {}", f.join(", "))
    }
}

async fn send(
    channel: Conn,
    route: &Route,
    m: &MethodDescriptor,
    request: DynamicMessage,
    timeout: std::time::Duration,
) -> Result<tonic::Response<tonic::Streaming<DynamicMessage>>, String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| {
        format!(
            "the gateway connection: {}",
            tether_runtime::report::chain(&e)
        )
    })?;
    let path: http::uri::PathAndQuery = format!("/{}/{}", m.parent_service().full_name(), m.name())
        .parse()
        .map_err(|e| format!("method path: {e}"))?;
    // One request message, whatever the method's shape: on the wire a unary call is a stream
    // of one each way.
    let req = route.request(futures::stream::iter([request]), timeout)?;
    grpc.streaming(req, path, DynamicCodec(m.output()))
        .await
        .map_err(status)
}

/// The reflection service's method, in its two versions.
const REFLECTION_V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const REFLECTION_V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// Why reflection gave no descriptors.
enum Reflection {
    /// The upstream does not serve this version of it.
    Unimplemented,
    /// Anything else, said for a person.
    Failed(String),
}

impl From<String> for Reflection {
    fn from(m: String) -> Reflection {
        Reflection::Failed(m)
    }
}

/// Asks the upstream, through the reflection method at `path`, for the file declaring
/// `symbol` and every file it imports.
async fn reflect(
    channel: &Conn,
    route: &Route,
    symbol: &str,
    timeout: std::time::Duration,
    path: &'static str,
) -> Result<DescriptorPool, Reflection> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let mut files: BTreeMap<String, prost_types::FileDescriptorProto> = BTreeMap::new();
    let mut wanted = vec![MessageRequest::FileContainingSymbol(symbol.to_owned())];
    let mut asked: BTreeSet<String> = BTreeSet::new();
    while !wanted.is_empty() {
        let reqs: Vec<ServerReflectionRequest> = wanted
            .drain(..)
            .map(|m| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(m),
            })
            .collect();
        let n = reqs.len();
        grpc.ready().await.map_err(|e| {
            format!(
                "the gateway connection: {}",
                tether_runtime::report::chain(&e)
            )
        })?;
        let codec =
            tonic_prost::ProstCodec::<ServerReflectionRequest, ServerReflectionResponse>::default();
        let mut replies = grpc
            .streaming(
                route.request(futures::stream::iter(reqs), timeout)?,
                http::uri::PathAndQuery::from_static(path),
                codec,
            )
            .await
            .map_err(|s| reflection_failed(route, s))?
            .into_inner();
        for _ in 0..n {
            let Some(ServerReflectionResponse {
                message_response, ..
            }) = replies
                .message()
                .await
                .map_err(|s| reflection_failed(route, s))?
            else {
                break;
            };
            match message_response {
                Some(MessageResponse::FileDescriptorResponse(f)) => {
                    for raw in f.file_descriptor_proto {
                        let fd = prost_types::FileDescriptorProto::decode(raw.as_slice())
                            .map_err(|e| format!("reflection sent a bad file descriptor: {e}"))?;
                        files.insert(fd.name().to_owned(), fd);
                    }
                }
                Some(MessageResponse::ErrorResponse(e)) => {
                    return Err(Reflection::Failed(format!(
                        "{} does not know {symbol} ({}); `grpcurl ... list` through the tunnel shows what it serves",
                        route.describe(),
                        e.error_message
                    )));
                }
                _ => {}
            }
        }
        for fd in files.values() {
            for dep in &fd.dependency {
                if !files.contains_key(dep) && asked.insert(dep.clone()) {
                    wanted.push(MessageRequest::FileByFilename(dep.clone()));
                }
            }
        }
    }
    let mut pool = DescriptorPool::new();
    pool.add_file_descriptor_protos(files.into_values())
        .map_err(|e| format!("the descriptors reflection sent do not fit together: {e}"))?;
    Ok(pool)
}

fn reflection_failed(route: &Route, s: tonic::Status) -> Reflection {
    if s.code() == tonic::Code::Unimplemented {
        Reflection::Unimplemented
    } else {
        Reflection::Failed(format!(
            "asking {} for its descriptors: {}",
            route.describe(),
            status(s)
        ))
    }
}

/// Encodes dynamic messages and decodes replies of one message type.
#[derive(Clone)]
struct DynamicCodec(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicCodec;
    type Decoder = DynamicCodec;

    fn encoder(&mut self) -> Self::Encoder {
        self.clone()
    }

    fn decoder(&mut self) -> Self::Decoder {
        self.clone()
    }
}

impl Encoder for DynamicCodec {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(format!("encoding the request: {e}")))
    }
}

impl Decoder for DynamicCodec {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Self::Error> {
        DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("decoding the reply: {e}")))
    }
}
