"""Offline schemas for the two custom kinds in deploy/k8s, which Kubernetes' own schemas do not know.

Each lists the fields its CRD defines at the levels our manifests use, and rejects any other field
(as `kubernetes-validate --strict` does for built-in kinds):
- ServiceMonitor, monitoring.coreos.com/v1 (prometheus-operator 0.8x);
- InferenceService, serving.kserve.io/v1beta1 (KServe 0.1x): its predictor is a Kubernetes PodSpec
  plus KServe's component fields, so the PodSpec, Container, ObjectMeta and LabelSelector parts are
  Kubernetes' own strict schemas from kubernetes-validate, and only KServe's fields are listed here.
Nested objects our manifests do not use (TLS, auth, relabelings, loggers, ...) are checked as objects only.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

import importlib_resources
import jsonschema
from referencing import Registry, Resource

K8S_VERSION = "1.37.0"
_DEFS = "/api/_definitions.json#/$defs/"
OBJECT_META = {"$ref": _DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
LABEL_SELECTOR = {"$ref": _DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"}
# Prometheus' duration format, as the CRD's pattern states it.
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
OBJECT = {"type": "object"}
STRING = {"type": "string"}
STRINGS = {"type": "array", "items": STRING}
BOOLEAN = {"type": "boolean"}
INTEGER = {"type": "integer"}
INT_OR_STRING = {"type": ["integer", "string"]}
STRING_MAP = {"type": "object", "additionalProperties": STRING}


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


SERVICE_MONITOR_ENDPOINT = _closed(
    {
        "port": STRING,
        "targetPort": INT_OR_STRING,
        "path": STRING,
        "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
        "params": {"type": "object", "additionalProperties": STRINGS},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": BOOLEAN,
        "honorTimestamps": BOOLEAN,
        "trackTimestampsStaleness": BOOLEAN,
        "metricRelabelings": {"type": "array", "items": OBJECT},
        "relabelings": {"type": "array", "items": OBJECT},
        "tlsConfig": OBJECT,
        "authorization": OBJECT,
        "basicAuth": OBJECT,
        "oauth2": OBJECT,
        "bearerTokenFile": STRING,
        "bearerTokenSecret": OBJECT,
        "proxyUrl": STRING,
        "noProxy": STRING,
        "proxyFromEnvironment": BOOLEAN,
        "proxyConnectHeader": OBJECT,
        "followRedirects": BOOLEAN,
        "enableHttp2": BOOLEAN,
        "filterRunning": BOOLEAN,
    }
)

SERVICE_MONITOR = _closed(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": OBJECT_META,
        "spec": _closed(
            {
                "endpoints": {"type": "array", "items": SERVICE_MONITOR_ENDPOINT},
                "selector": LABEL_SELECTOR,
                "namespaceSelector": _closed({"any": BOOLEAN, "matchNames": STRINGS}),
                "jobLabel": STRING,
                "targetLabels": STRINGS,
                "podTargetLabels": STRINGS,
                "sampleLimit": INTEGER,
                "targetLimit": INTEGER,
                "labelLimit": INTEGER,
                "labelNameLengthLimit": INTEGER,
                "labelValueLengthLimit": INTEGER,
                "keepDroppedTargets": INTEGER,
                "bodySizeLimit": STRING,
                "attachMetadata": _closed({"node": BOOLEAN}),
                "scrapeProtocols": STRINGS,
                "fallbackScrapeProtocol": STRING,
                "scrapeClass": STRING,
                "scrapeClassicHistograms": BOOLEAN,
                "convertClassicHistogramsToNHCB": BOOLEAN,
                "nativeHistogramBucketLimit": INTEGER,
                "nativeHistogramMinBucketFactor": INT_OR_STRING,
                "selectorMechanism": {"enum": ["RelabelConfig", "RoleSelector"]},
                "serviceDiscoveryRole": {"enum": ["Endpoints", "EndpointSlice"]},
            },
            required=("selector",),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)

# KServe's ComponentExtensionSpec and PredictorSpec fields, beside the PodSpec's own.
KSERVE_PREDICTOR_FIELDS: dict[str, Any] = {
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": INTEGER,
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "scaleMetricType": {"enum": ["Utilization", "AverageValue", "Value"]},
    "autoScaling": OBJECT,
    "containerConcurrency": INTEGER,
    "timeout": INTEGER,
    "canaryTrafficPercent": INTEGER,
    "logger": OBJECT,
    "batcher": OBJECT,
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
    "deploymentStrategy": OBJECT,
    "workerSpec": OBJECT,
    "model": OBJECT,
}


@cache
def _k8s_schema(filename: str) -> dict[str, Any]:
    schemas = importlib_resources.files("kubernetes_validate") / "kubernetes-json-schema"
    folder = schemas / f"v{K8S_VERSION}-local-strict"
    loaded: dict[str, Any] = json.loads((folder / filename).read_text())
    return loaded


def inference_service_schema() -> dict[str, Any]:
    predictor = copy.deepcopy(_k8s_schema("podspec-v1.json"))
    assert predictor.get("additionalProperties") is False, "expected the strict PodSpec schema"
    predictor["properties"].update(KSERVE_PREDICTOR_FIELDS)
    return _closed(
        {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"},
            "kind": {"const": "InferenceService"},
            "metadata": OBJECT_META,
            "spec": _closed(
                {"predictor": predictor, "transformer": OBJECT, "explainer": OBJECT}, required=("predictor",)
            ),
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    )


SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): lambda: SERVICE_MONITOR,
    ("serving.kserve.io/v1beta1", "InferenceService"): inference_service_schema,
}


def validate_custom(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError if a custom object has a field or value its CRD does not allow."""
    key = (obj["apiVersion"], obj["kind"])
    if key not in SCHEMAS:
        raise KeyError(f"no schema for {key}: add the CRD's fields to {__name__}")
    registry: Registry[Any] = Resource.from_contents(_k8s_schema("_definitions.json")) @ Registry()
    # Kubernetes' schemas refer to their definitions relative to their own $id: share its base.
    schema = {**SCHEMAS[key](), "$id": "https://kubernetes.io/api/nnserve-custom-kinds.json"}
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    validator.validate(obj)
