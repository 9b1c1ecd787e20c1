"""xDS v3 type URLs and the order resources are sent in, shared by control server and sidecar.

Order matters for consistency: clusters and their endpoints reach a node before the listeners
and routes that name them, so a route never points at a cluster the node does not know.
"""
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

SHORT = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS"}

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_PROTOCOL_OPTIONS = "type.googleapis.com/" + HTTP_PROTOCOL_OPTIONS_KEY

# Keys of the node metadata a protomesh sidecar announces itself with (registration).
META_ROLE = "protomesh.role"  # "sidecar" | "gateway"
META_SERVICE = "protomesh.service"
META_PROTOCOL = "protomesh.protocol"
META_INBOUND = "protomesh.inbound"  # host:port peers should call
META_APP = "protomesh.app"  # host:port of the local app
META_OUTBOUND_HTTP = "protomesh.outbound_http"
META_OUTBOUND_GRPC = "protomesh.outbound_grpc"
META_LABELS = "protomesh.labels"
META_FLAVOUR = "protomesh.flavour"  # "protomesh" (our sidecar); envoy / grpc come later
