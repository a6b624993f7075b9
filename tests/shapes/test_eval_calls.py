"""nxc-eval's module-call task (nxc.shapes.eval_calls): the scorer on replies whose rightness is known (a chat that
answers each request with its true call, one that never calls, one that calls the wrong module), and the module tasks'
requests and calls (nxc.shapes.module_tasks)."""
from types import SimpleNamespace

import numpy as np

from nxc.module_calls import ModuleCallParser
from nxc.runtime.events import Detection
from nxc.shapes.data import make_scene
from nxc.shapes.eval_calls import evaluate_calls, first_call
from nxc.shapes.module_tasks import MODULE_OF, MODULE_TASKS, module_sample


def test_each_module_task_answers_with_one_well_formed_call():
    rng = np.random.default_rng(0)
    for task in MODULE_TASKS:
        for _ in range(20):
            s = module_sample(rng, task, make_scene(rng, max_objects=3))
            p = ModuleCallParser()
            calls = p.feed(s.answer) + p.close()
            assert len(calls) == 1 and calls[0].module == MODULE_OF[task], (s.question, s.answer)
            assert s.answer.count("<at> <boxes>") == len(s.answer_objects)
            assert ("[0]" in s.question) == (calls[0].region_ref == 0) == bool(s.boxes_in)


def _oracle(truth: dict):
    """A chat that answers each request with its true call, the box head's box at the object's box."""
    def chat(image, text, boxes):
        s = truth[text]
        return SimpleNamespace(raw_text=s.answer, text=s.answer,
                               detections=[Detection(box=np.asarray(o.box, np.float32), box_norm=None, phrase="")
                                           for o in s.answer_objects])
    return chat


def test_the_scorer_gives_a_right_model_1_and_a_silent_one_0():
    rng = np.random.default_rng([7, 2929])
    truth = {}
    for task in MODULE_TASKS:                       # the same draws evaluate_calls makes
        for _ in range(6):
            s = module_sample(rng, task, make_scene(rng, max_objects=3))
            truth[s.question] = s
    right = evaluate_calls(_oracle(truth), seed=7, n=6, progress=False)
    assert right["module_choice"] == right["instruction_accuracy"] == right["region_acc@0.5"] == 1.0
    assert right["per_task"] == {t: 1.0 for t in MODULE_TASKS}
    silent = evaluate_calls(lambda i, t, b: SimpleNamespace(text="No.", detections=[]), seed=7, n=6, progress=False)
    assert silent["module_choice"] == 0.0 and silent["region_acc@0.5"] == 0.0
    wrong = evaluate_calls(lambda i, t, b: SimpleNamespace(
        text="<module>Q</module><instruction>x</instruction>", detections=[]), seed=7, n=6, progress=False)
    assert wrong["module_choice"] == 0.0
    assert first_call("Sure. <module>B</module><instruction>a</instruction>").module == "B"
