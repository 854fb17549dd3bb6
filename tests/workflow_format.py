"""Convert ComfyUI workflows between the API format and the UI (graph) format.

The UI format is what the browser saves and loads (nodes with positions,
links, ``widgets_values``); the API format is what ``/prompt`` takes. The
mapping of widget values to input names comes from the server's
``/object_info``: widget inputs in declaration order, plus the extra
"control after generate" value the frontend stores after seed-like inputs.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Nodes that carry many widgets (and the DNO chart) need room, or they overlap when the
# frontend grows them to their content.
NODE_SIZES = {"DNOKSampler": [360, 840], "DNOSampler": [360, 640], "KSampler": [320, 480],
              "CLIPTextEncode": [400, 200]}
DEFAULT_SIZE = [320, 160]


def _input_specs(info: dict) -> List[tuple]:
    """(name, type, options, optional) in declaration order."""
    specs = []
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        inputs = info["input"].get(section, {})
        for name in order.get(section, list(inputs)):
            spec = inputs[name]
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, "COMBO" if isinstance(kind, list) else kind, options, section == "optional"))
    return specs


def is_widget(kind: str) -> bool:
    return kind in WIDGET_TYPES


def _has_control(options: dict) -> bool:
    return bool(options.get("control_after_generate"))


def api_to_ui(api: Dict[str, Any], object_info: Dict[str, Any]) -> Dict[str, Any]:
    ids = {key: i + 1 for i, key in enumerate(api)}
    depth: Dict[str, int] = {}

    def node_depth(key):
        if key not in depth:
            depth[key] = 0
            parents = [v[0] for v in api[key]["inputs"].values() if isinstance(v, list)]
            depth[key] = 1 + max((node_depth(p) for p in parents), default=-1)
        return depth[key]

    links, nodes = [], []
    out_links = defaultdict(list)
    column_y = defaultdict(lambda: 40)
    for key, node in api.items():
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, kind, options, optional in _input_specs(info):
            value = node["inputs"].get(name)
            if is_widget(kind):
                if name not in node["inputs"]:
                    if not optional:
                        raise ValueError(f"node {key} ({node['class_type']}): required input {name!r} is missing")
                    value = options.get("default")
                widgets.append(value)
                if _has_control(options):
                    widgets.append("fixed")
                continue
            link_id = None
            if isinstance(value, list):
                link_id = len(links) + 1
                src = value[0]
                links.append([link_id, ids[src], value[1], ids[key], len(inputs),
                              object_info[api[src]["class_type"]]["output"][value[1]]])
                out_links[(src, value[1])].append(link_id)
            elif value is not None:
                raise ValueError(f"node {key}: input {name!r} of type {kind} must be a link")
            if link_id is not None or not optional:
                inputs.append({"name": name, "type": kind, "link": link_id})
        col = node_depth(key)
        size = list(NODE_SIZES.get(node["class_type"], DEFAULT_SIZE))
        nodes.append({
            "id": ids[key], "type": node["class_type"],
            "pos": [40 + 440 * col, column_y[col]], "size": size,
            "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": [],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets, "title": node.get("_meta", {}).get("title", node["class_type"]),
            "_api_key": key,
        })
        column_y[col] += size[1] + 60
    # fix input slot indices in links (inputs list holds only link inputs) and add outputs
    for node in nodes:
        key = node.pop("_api_key")
        info = object_info[node["type"]]
        node["outputs"] = [{"name": name, "type": kind, "links": out_links.get((key, i), []), "slot_index": i}
                           for i, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    for order, key in enumerate(sorted(api, key=node_depth)):
        nodes[ids[key] - 1]["order"] = order
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(ui: Dict[str, Any], object_info: Dict[str, Any]) -> Dict[str, Any]:
    link_src = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        values = list(node.get("widgets_values", []))
        linked = {i["name"]: i["link"] for i in node.get("inputs", [])}
        inputs = {}
        for name, kind, options, _ in _input_specs(info):
            if is_widget(kind):
                inputs[name] = values.pop(0)
                if _has_control(options):
                    values.pop(0)
            elif linked.get(name) is not None:
                src, slot = link_src[linked[name]]
                inputs[name] = [src, slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return api


def same_graph(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """API graphs equal up to node ids (ids renumbered in key order)."""
    def canon(api):
        order = {k: str(i + 1) for i, k in enumerate(api)}
        out = {}
        for k, n in api.items():
            ins = {name: ([order[v[0]], v[1]] if isinstance(v, list) else v) for name, v in n["inputs"].items()}
            out[order[k]] = (n["class_type"], ins)
        return out
    return canon(a) == canon(b)
