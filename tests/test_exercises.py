"""The exercises at the end of the chapters: their structure, and every command in them checked by the library itself.

Each regime chapter, Comparison, Embeddings and Errors ends with a section "Exercises": 2-4 ``{exercise}``
directives (sphinx-exercise, MyST colon fences), each followed by the ``{solution}`` of that exercise, folded
(``:class: dropdown``). Every ``transferstudy`` command in them is parsed by the command line's own parser; a
``transferstudy run`` must select runs of the matrix with each ``--only`` glob (``runner.matrix``), write into a
store of its own, and pass ``-p`` settings that exist (``config.SCHEMA``), that a selected regime reads
(``config.notebook_names``) and whose values ``config.check_overrides`` accepts, exactly as the runner checks
them before it runs anything. A ``transferstudy compare`` must name run folders that the book's store or the
exercise's own run commands hold.
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ANALYSIS_CHAPTERS, REPO

from transferstudy import cli, config, runner

CHAPTERS = [f"book/regimes/{regime}" for regime in config.NOTEBOOK_REGIMES] + [
    *(f"book/{analysis}" for analysis in ANALYSIS_CHAPTERS), "book/comparison", "book/embeddings", "book/errors"]
BOOK_STORE = "runs"  # the store `make book` writes and the exercises compare with
DIRECTIVE = re.compile(r"^:::\{(exercise|solution)\}[ \t]*(.*?)\n(.*?)^:::[ \t]*$", re.M | re.S)
BASH = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`((?:transferstudy|papermill) [^`]+)`(?!`)")


@dataclass
class Directive:
    kind: str  # exercise | solution
    argument: str  # an exercise's title; a solution's exercise label
    options: dict[str, str]
    body: str


@dataclass
class Exercise:
    label: str
    title: str
    body: str
    solution: Directive | None = None
    commands: list[str] = field(default_factory=list)


def directives(text: str) -> list[Directive]:
    found = []
    for kind, argument, content in DIRECTIVE.findall(text):
        lines = content.splitlines()
        options = {}
        while lines and (m := re.fullmatch(r":([\w-]+):\s*(.*)", lines[0])):
            options[m[1]] = m[2].strip()
            lines.pop(0)
        found.append(Directive(kind, argument.strip(), options, "\n".join(lines)))
    return found


def exercises_section(text: str) -> str | None:
    """The page's last section if it is "Exercises", else None."""
    sections = re.split(r"^## ", text, flags=re.M)
    last = sections[-1]
    return last.split("\n", 1)[1] if len(sections) > 1 and last.startswith("Exercises\n") else None


def commands(body: str) -> list[str]:
    """The shell commands of a directive: each line of its ```bash blocks, and inline `transferstudy ...` spans."""
    found = []
    for block in BASH.findall(body):
        found += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    spans = [" ".join(span.split()) for span in INLINE.findall(body)]
    found += [span for span in spans if len(span.split()) > 2]  # `transferstudy compare` alone names the command
    return found


def chapter_problems(text: str) -> tuple[list[Exercise], list[str]]:
    """The exercises of a chapter's text, and what is wrong with their structure."""
    problems = []
    section = exercises_section(text)
    if section is None:
        return [], ['the page does not end with a section "## Exercises"']
    everywhere = directives(text)
    found = directives(section)
    if len(everywhere) != len(found):
        problems.append("an exercise or solution outside the Exercises section")
    exercises: list[Exercise] = []
    for i, d in enumerate(found):
        if d.kind == "exercise":
            label = d.options.get("label", "")
            if not re.fullmatch(r"ex-[a-z0-9]+(-[a-z0-9]+)*-\d+", label):
                problems.append(f"exercise {d.argument!r} has no label of the form ex-<chapter>-<n>: {label!r}")
            if not d.argument:
                problems.append(f"exercise {label} has no title")
            exercises.append(Exercise(label, d.argument, d.body, commands=commands(d.body)))
            following = found[i + 1] if i + 1 < len(found) else None
            if following is None or following.kind != "solution":
                problems.append(f"exercise {label} is not followed by its solution")
        else:
            previous = found[i - 1] if i else None
            if previous is None or previous.kind != "exercise":
                problems.append(f"solution {d.argument!r} does not follow an exercise")
                continue
            if d.argument != previous.options.get("label"):
                problems.append(f"the solution after exercise {previous.options.get('label')} names {d.argument!r}")
            if d.options.get("class") != "dropdown":
                problems.append(f"the solution of {d.argument} is not a dropdown (:class: dropdown)")
            exercises[-1].solution = d
            exercises[-1].commands += commands(d.body)
    if not 2 <= len(exercises) <= 4:
        problems.append(f"{len(exercises)} exercises; a chapter has 2 to 4")
    return exercises, problems


# --- the commands ---------------------------------------------------------------------------------------


def _parse(words: list[str]):
    """The command line's own parse of ``transferstudy WORDS``; SystemExit (argparse's error) becomes a problem."""
    try:
        return cli.build_parser(words[0]).parse_args(words), None
    except SystemExit:
        return None, f"`transferstudy {' '.join(words)}` is not a valid command line"


def _made(run_commands: list, runs_dir: str, profile: str) -> set[str]:
    """The run keys that the exercise's own `transferstudy run` commands write into ``runs_dir/profile``."""
    return {spec.key for args in run_commands if Path(args.runs_dir) == Path(runs_dir) and args.profile == profile
            for spec in runner.matrix(args.only)}


def run_problems(args) -> list[str]:
    problems = []
    if args.only is None:
        return ["`transferstudy run` without --only reruns the whole study: name the runs the exercise needs"]
    for glob in (g.strip() for g in args.only.split(",") if g.strip()):
        try:
            runner.matrix(glob)
        except runner.RunnerError:
            problems.append(f"--only {glob!r} matches no run of the matrix")
    if problems:
        return problems
    if Path(args.runs_dir) == Path(BOOK_STORE):
        problems.append(f"--runs-dir {args.runs_dir}: an exercise writes into a store of its own, not the book's")
    specs = runner.matrix(args.only)
    regimes = {s.regime for s in specs}
    overrides = {}
    for key, value in args.param:
        if key not in config.SCHEMA:
            problems.append(f"-p {key}: not a setting (config.SCHEMA has no {key!r})")
            continue
        if not any(key in config.notebook_names(r) and key not in config.run_names(r) for r in regimes):
            problems.append(f"-p {key}: none of the selected regimes ({', '.join(sorted(regimes))}) reads it")
            continue
        overrides[key] = config.parse_value(value)
    if overrides and not problems:
        try:
            config.check_overrides(overrides, [(s.regime, s.model, s.dataset) for s in specs], args.profile)
        except config.ConfigError as exc:
            problems.append(f"-p: {exc}")
    return problems


def compare_problems(args, made: list) -> list[str]:
    problems = []
    keys = {spec.key for spec in runner.matrix()}
    for folder in (args.run_a, args.run_b):
        parts = Path(folder).parts
        if len(parts) < 5 or "/".join(parts[-3:]) not in keys or parts[-4] not in config.profiles():
            problems.append(f"compare {folder}: not a run folder <store>/<profile>/<dataset>/<model>/<regime>")
            continue
        store, profile, key = str(Path(*parts[:-4])), parts[-4], "/".join(parts[-3:])
        if store != BOOK_STORE and key not in _made(made, store, profile):
            problems.append(f"compare {folder}: no `transferstudy run` of the exercise writes that run")
    return problems


def papermill_problems(words: list[str]) -> list[str]:
    rest = words[3:]
    if len(words) < 3 or len(rest) % 3 or rest[0::3] != ["-p"] * (len(rest) // 3):
        return [f"papermill: expected `papermill NOTEBOOK OUT -p KEY VALUE ...`, got {' '.join(words)}"]
    notebook = Path(words[1]).name
    regime = next((r for r, nb in runner.NOTEBOOKS.items() if nb == notebook), None)
    if regime is None:
        return [f"papermill {words[1]}: not one of the regime or analysis notebooks"]
    params = {rest[i + 1]: rest[i + 2] for i in range(0, len(rest), 3)}
    unknown = sorted(set(params) - config.notebook_names(regime))
    if unknown:
        return [f"papermill -p {name}: not a parameter of the {regime} notebook" for name in unknown]
    settings = {k: config.parse_value(v) for k, v in params.items() if k not in config.run_names(regime)}
    try:
        config.resolve(regime, params.get("model", ""), params.get("dataset", ""), params.get("profile", "full"),
                       settings)
    except config.ConfigError as exc:
        return [f"papermill: {exc}"]
    return []


def command_problems(exercise: Exercise) -> list[str]:
    problems = []
    parsed = []
    for command in exercise.commands:
        words = shlex.split(command)
        if words[0] == "transferstudy":
            args, problem = _parse(words[1:])
            if problem:
                problems.append(problem)
            else:
                parsed.append(args)
        elif words[0] == "papermill":
            problems += papermill_problems(words)
        elif words[0] != "jupyter-book":
            problems.append(f"{command}: not a command of this project")
    runs = [a for a in parsed if a.command == "run"]
    for args in runs:
        problems += run_problems(args)
    for args in parsed:
        if args.command == "compare":
            problems += compare_problems(args, [a for a in runs if not run_problems(a)])
    return [f"{exercise.label}: {p}" for p in problems]


# --- the book's chapters --------------------------------------------------------------------------------


def _chapter(doc: str) -> tuple[list[Exercise], list[str]]:
    return chapter_problems((REPO / f"{doc}.md").read_text())


@pytest.mark.parametrize("doc", CHAPTERS)
def test_the_chapter_ends_with_2_to_4_exercises_each_with_its_folded_solution(doc):
    exercises, problems = _chapter(doc)
    assert not problems, problems
    assert all(e.solution is not None for e in exercises)


@pytest.mark.parametrize("doc", CHAPTERS)
def test_every_command_of_the_chapters_exercises_is_one_the_library_accepts(doc):
    exercises, _ = _chapter(doc)
    problems = [p for e in exercises for p in command_problems(e)]
    assert not problems, "\n".join(problems)


def test_exercise_labels_are_unique_across_the_book_and_every_reference_to_one_exists():
    labels = Counter()
    text = ""
    for page in sorted((REPO / "book").rglob("*.md")):
        if "_generated" in page.parts:
            continue
        page_text = page.read_text()
        text += page_text
        labels.update(d.options.get("label") for d in directives(page_text) if d.kind == "exercise")
    assert labels and not [label for label, n in labels.items() if n > 1], labels
    assert sum(labels.values()) == sum(len(_chapter(doc)[0]) for doc in CHAPTERS)  # all in the chapters above
    referenced = set(re.findall(r"\{(?:ref|numref)\}`(?:[^`<]*<)?(ex-[\w-]+)>?`", text))
    assert referenced and referenced <= set(labels), referenced - set(labels)


def test_the_exercises_change_settings_in_most_chapters_and_the_rest_ask_about_the_page():
    runs_per_chapter = {doc: sum(c.startswith("transferstudy run ") for e in _chapter(doc)[0] for c in e.commands)
                        for doc in CHAPTERS}
    assert all(runs_per_chapter[f"book/regimes/{r}"] for r in config.NOTEBOOK_REGIMES), runs_per_chapter
    assert all(runs_per_chapter[f"book/{a}"] for a in ANALYSIS_CHAPTERS), runs_per_chapter
    assert sum(n > 0 for n in runs_per_chapter.values()) >= len(CHAPTERS) - 1


def test_reproduce_keeps_a_lesson_plan_that_names_every_exercise_and_no_list_of_its_own():
    text = (REPO / "book" / "reproduce.md").read_text()
    plan = text[text.index("## Using it in class"):]
    assert "(exercise-conventions)=\n## Using it in class" in text  # the chapters' exercises link here
    assert not directives(text)
    assert not re.search(r"^\d+\. \*\*", plan, flags=re.M)  # the old numbered list of exercises is gone
    titles = {e.label: e.title for doc in CHAPTERS for e in _chapter(doc)[0]}
    links = dict((label, text) for text, label in re.findall(r"\{ref\}`([^`<]+?) <(ex-[\w-]+)>`", plan))
    assert links == titles  # every exercise, under its own title
    assert "estimate" in plan and "not a measurement" in plan  # Colab times are not measured


# --- the checks fail where they should --------------------------------------------------------------------

SYNTHETIC = """
# A chapter

Some text.

## Exercises

:::{{exercise}} One
:label: ex-synthetic-1

```bash
{command}
```
:::

:::{{solution}} ex-synthetic-1
:class: dropdown

Look at the curves.
:::

:::{{exercise}} Two
:label: ex-synthetic-2

A question about the page.
:::

:::{{solution}} ex-synthetic-2
:class: dropdown

An answer.
:::
"""
GOOD = "transferstudy run --profile quick --runs-dir runs-x --only 'cifar10/alexnet/partial' -p lr_backbone 1e-3"


def _synthetic(command: str = GOOD) -> tuple[list[Exercise], list[str]]:
    text = SYNTHETIC.format(command=command)
    exercises, problems = chapter_problems(text)
    return exercises, problems + [p for e in exercises for p in command_problems(e)]


def test_a_good_synthetic_chapter_passes():
    exercises, problems = _synthetic()
    assert problems == [] and [e.label for e in exercises] == ["ex-synthetic-1", "ex-synthetic-2"]
    assert exercises[0].commands == [GOOD]


@pytest.mark.parametrize(("command", "complaint"), [
    (GOOD.replace("lr_backbone", "lr_bakcbone"), "-p lr_bakcbone: not a setting"),
    (GOOD.replace("lr_backbone 1e-3", "no_such_setting 1"), "-p no_such_setting: not a setting"),
    (GOOD.replace("partial", "linear_probe"), "-p lr_backbone: none of the selected regimes (linear_probe) reads it"),
    (GOOD.replace("-p lr_backbone 1e-3", "-p embedding cls").replace("partial", "frozen_svm"),
     "embedding='cls': not a choice for alexnet"),
    (GOOD.replace("1e-3", "-1"), "lr_backbone=-1"),
    (GOOD.replace("cifar10/alexnet/partial", "cifar10/resnet/*"), "--only 'cifar10/resnet/*' matches no run"),
    (GOOD.replace("--runs-dir runs-x", "--runs-dir runs"), "a store of its own"),
    (GOOD.replace("--profile quick", "--profile quik"), "is not a valid command line"),
    (GOOD.replace(" --only 'cifar10/alexnet/partial'", ""), "without --only"),
    ("transferstudy compare runs/quick/cifar10/alexnet/partial runs-y/quick/cifar10/alexnet/partial",
     "compare runs-y/quick/cifar10/alexnet/partial: no `transferstudy run` of the exercise writes that run"),
    ("transferstudy compare runs/quick/cifar10/alexnet/partial runs/quick/cifar10/vgg/partial", "not a run folder"),
    ("papermill notebooks/02_linear_probe.ipynb out.ipynb -p model alexnet -p dataset cifar10 -p lr_head 1e-3",
     "papermill -p lr_head: not a parameter of the linear_probe notebook"),
    ("papermill notebooks/02_linear_probe.ipynb out.ipynb -p model alexnet -p dataset cifar10 -p lr 0",
     "lr=0"),
    ("python train.py", "not a command of this project"),
])
def test_a_command_that_names_what_does_not_exist_fails(command, complaint):
    _, problems = _synthetic(command)
    assert any(complaint in p for p in problems), problems


def test_a_compare_of_runs_the_exercise_makes_passes_and_papermill_lines_are_checked_too():
    made = GOOD + "\ntransferstudy compare runs/quick/cifar10/alexnet/partial runs-x/quick/cifar10/alexnet/partial"
    assert _synthetic(made)[1] == []
    papermill = ("papermill notebooks/02_linear_probe.ipynb out.ipynb -p model deit_base -p dataset ferplus "
                 "-p data_dir data/ferplus -p profile smoke -p pretrained False -p lr 1e-3")
    assert _synthetic(papermill)[1] == []


@pytest.mark.parametrize(("old", "new", "complaint"), [
    (":::{solution} ex-synthetic-1", ":::{solution} ex-synthetic-2", "names 'ex-synthetic-2'"),
    (":class: dropdown\n\nLook", ":class: note\n\nLook", "is not a dropdown"),
    (":label: ex-synthetic-2", ":label: synthetic two", "no label of the form"),
    ("## Exercises", "## Practice", 'does not end with a section "## Exercises"'),
])
def test_a_broken_structure_fails(old, new, complaint):
    text = SYNTHETIC.format(command=GOOD)
    assert text.count(old) == 1
    _, problems = chapter_problems(text.replace(old, new))
    assert any(complaint in p for p in problems), problems


def test_one_exercise_alone_or_a_missing_solution_fails():
    text = SYNTHETIC.format(command=GOOD)
    one = text[: text.index(":::{exercise} Two")]
    assert any("1 exercises; a chapter has 2 to 4" in p for p in chapter_problems(one)[1])
    start = text.index(":::{solution} ex-synthetic-2")
    unsolved = text[:start] + text[text.index(":::", start + 3) + 3:]
    assert any("ex-synthetic-2 is not followed by its solution" in p for p in chapter_problems(unsolved)[1])
