"""ui_to_api on hand-made node definitions: the frontend's widget rules and the refusals."""
import pytest

from fixtures.workflow_format import WorkflowFormatError, ui_to_api, widget_layout

INFO = {
    "Sampler": {
        "display_name": "Sampler",
        "input": {"required": {"model": ["MODEL"], "seed": ["INT", {"control_after_generate": True}],
                               "noise_seed": ["INT", {}], "steps": ["INT", {}], "name": [["a", "b"]]},
                  "optional": {"cfg": ["FLOAT", {}], "extra": ["INT", {"forceInput": True}]}},
        "input_order": {"required": ["model", "seed", "noise_seed", "steps", "name"], "optional": ["cfg", "extra"]},
    },
    "Loader": {"display_name": "Loader", "input": {"required": {"file": [["x.png"], {"image_upload": True}]}},
               "input_order": {"required": ["file"]}},
    "Text": {"display_name": "Text", "input": {"required": {"text": ["STRING", {"dynamicPrompts": True}]}},
             "input_order": {"required": ["text"]}},
}


def node(id, type, widgets, inputs=(), mode=0, title=None):
    n = {"id": id, "type": type, "mode": mode, "widgets_values": widgets,
         "inputs": [{"name": name, "link": link} for name, link in inputs]}
    if title:
        n["title"] = title
    return n


def test_widget_layout_follows_the_frontend():
    # seed: explicit control; noise_seed: control by name; forceInput: a socket, no widget
    assert widget_layout(INFO["Sampler"]) == [("seed", 2), ("noise_seed", 2), ("steps", 1), ("name", 1), ("cfg", 1)]
    assert widget_layout(INFO["Loader"]) == [("file", 2)]  # the upload button's value follows


def test_values_links_titles_and_notes():
    ui = {"nodes": [
        node(2, "Loader", ["x.png", "image"]),
        node(5, "Sampler", [7, "fixed", 8, "randomize", 20, "b", 4.5], [("model", 1), ("steps", 2)], title="My sampler"),
        node(9, "MarkdownNote", ["# hi"]),
    ], "links": [[1, 2, 0, 5, 0, "MODEL"], [2, 2, 1, 5, 3, "INT"]]}
    assert ui_to_api(ui, INFO) == {
        "2": {"inputs": {"file": "x.png"}, "class_type": "Loader", "_meta": {"title": "Loader"}},
        "5": {"inputs": {"model": ["2", 0], "seed": 7, "noise_seed": 8, "steps": ["2", 1], "name": "b", "cfg": 4.5},
              "class_type": "Sampler", "_meta": {"title": "My sampler"}},
    }


@pytest.mark.parametrize("bad, message", [
    (node(1, "Loader", ["x.png"]), "1 widgets_values"),
    (node(1, "Loader", ["x.png", "image"], mode=4), "mode 4"),
    (node(1, "Unknown", []), "unknown node type"),
    (node(1, "Text", ["a {red|blue} car"]), "dynamic-prompt"),
    (node(1, "Loader", ["x.png", "image"], [("file", 99)]), "missing link 99"),
])
def test_refusals(bad, message):
    with pytest.raises(WorkflowFormatError, match=message):
        ui_to_api({"nodes": [bad], "links": []}, INFO)
