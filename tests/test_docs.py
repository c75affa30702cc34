"""The docs stay true: links and anchors, file paths and module names, the command lines they show, the Python
snippets, the tables, and the README's size. Fast (nothing trains, nothing is downloaded): the only heavy import is
the recipe parser (torch + transformers), for the `recipes/train.py` command lines."""
import ast
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
BENCHMARKS = ROOT / "benchmarks" / "README.md"
ALL_DOCS = [README, *DOC_PAGES, BENCHMARKS]
README_LIMIT = 10_000  # characters: the README is the front door, reference material lives in docs/
CHECKED_ROOTS = ("sft_hf", "recipes", "tests", "benchmarks", "accelerate_configs")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def docs_params(docs=ALL_DOCS):
    return [pytest.param(p, id=rel(p)) for p in docs]


# --- Markdown, read the way GitHub renders it -------------------------------------------------------------------

def split_markdown(text: str):
    """(prose, blocks): the text with fenced code blanked out (line numbers kept), and [(lang, code, line)]."""
    prose, blocks, fence, lang, code, start = [], [], None, "", [], 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence, lang, code, start = stripped[:3], stripped[3:].strip().lower(), [], number
            prose.append("")
        elif fence is not None and stripped.startswith(fence) and not stripped[3:].strip():
            blocks.append((lang, "\n".join(code), start))
            fence = None
            prose.append("")
        elif fence is not None:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"unclosed code fence opened on line {start}"
    return "\n".join(prose), blocks


INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)


def inline_code(prose: str) -> list[str]:
    return [m.group(2).replace("\n", " ").strip() for m in INLINE_CODE.finditer(prose) if "\n\n" not in m.group(2)]


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: markup dropped, lowercase, punctuation dropped, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path.read_text())
    seen, result = {}, set()
    for match in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", prose, re.MULTILINE):
        slug = github_slug(match.group(1))
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")  # repeated headings: slug-1, slug-2, ...
        seen[slug] = seen.get(slug, 0) + 1
    return result


LINK = re.compile(r"!?\[(?:[^\]]|\][^(])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[str]:
    prose, _ = split_markdown(path.read_text())
    prose = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), prose)  # `[x](y)` in code is not a link
    return [m.group(1) for m in LINK.finditer(prose)]


# --- links and anchors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", docs_params())
def test_relative_links_point_to_files_and_headings(doc):
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        target_path = (doc.parent / file_part).resolve() if file_part else doc
        if not target_path.exists():
            broken.append(f"{target}: no file {target_path}")
        elif anchor and target_path.suffix == ".md" and anchor not in anchors(target_path):
            broken.append(f"{target}: no heading #{anchor} in {rel(target_path)}")
    assert not broken, "\n".join(broken)


def test_slugs_follow_github():
    assert github_slug("Chapter 7's evaluation on a real model") == "chapter-7s-evaluation-on-a-real-model"
    assert github_slug("W3: a real model (SmolLM2-135M), in-process and through the user's command (issue 15)") == (
        "w3-a-real-model-smollm2-135m-in-process-and-through-the-users-command-issue-15")
    assert github_slug("Non-finite loss, interrupted saves, non-empty output_dir") == (
        "non-finite-loss-interrupted-saves-non-empty-output_dir")
    assert github_slug("Set up (two commands)") == "set-up-two-commands"
    assert github_slug("`sft-hf inspect`") == "sft-hf-inspect"


def test_every_doc_page_says_what_it_covers_and_links_back_to_the_readme():
    assert DOC_PAGES, "docs/ has no pages"
    for page in DOC_PAGES:
        prose, _ = split_markdown(page.read_text())
        paragraphs = [p for p in prose.split("\n\n") if p.strip()]
        assert paragraphs[0].startswith("# "), f"{rel(page)} starts with its title"
        assert "](../README.md)" in paragraphs[1], f"{rel(page)}: the first paragraph links back to the README"
    readme_links = set(links(README))
    missing = [rel(p) for p in DOC_PAGES if rel(p) not in readme_links]
    assert not missing, f"the README's map of the docs lacks {missing}"


# --- paths and module names -------------------------------------------------------------------------------------

PATH = re.compile(r"(?<![\w./~$-])((?:" + "|".join(CHECKED_ROOTS) + r")/[\w./*-]*)")
MODULE = re.compile(r"(?<![\w./-])(sft_hf(?:\.\w+)+)")


def mentioned_paths(text: str) -> set[str]:
    found = set()
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".,:;")
        following = text[match.end():match.end() + 1]
        if "..." in path or "*" in path or following in ("<", "{") or path.endswith("/."):
            continue  # a placeholder (`recipes/<recipe>.yaml`, `recipes/...yaml`) or a glob
        found.add(path)
    return found


def defined_names(module_file: Path) -> set[str]:
    names = set()
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def missing_module_names(text: str) -> list[str]:
    missing = []
    for dotted in {m.group(1) for m in MODULE.finditer(text)}:
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest prefix that is a module; the rest one name in it
            found = module_file(".".join(parts[:cut]))
            if found is not None:
                rest = parts[cut:]
                if len(rest) > 1 or (rest and rest[0] not in defined_names(found)):
                    missing.append(dotted)
                break
    return missing


@pytest.mark.parametrize("doc", docs_params())
def test_every_path_and_module_mentioned_exists(doc):
    text = doc.read_text()
    missing = sorted(p for p in mentioned_paths(text) if not (ROOT / p).exists())
    missing += sorted(missing_module_names(text))
    assert not missing, f"{rel(doc)} names what does not exist: {missing}"


def test_path_extraction():
    text = ("`sft_hf/run/gguf.py`, recipes/train.py. (`tests/test_checkpoints.py`) ~/.cache/sft_hf/gguf/ "
            "accelerate_configs/<config>.yaml recipes/...yaml benchmarks/README.md#w3 sft_hf.run.config.parse_recipe")
    assert mentioned_paths(text) == {"sft_hf/run/gguf.py", "recipes/train.py", "tests/test_checkpoints.py",
                                     "benchmarks/README.md"}
    assert missing_module_names("sft_hf.run.config.parse_recipe sft_hf.templates") == []
    assert missing_module_names("sft_hf.mc_eval and sft_hf.run.config.no_such_name") != []


# --- command lines ----------------------------------------------------------------------------------------------

def command_lines(doc: Path) -> list[str]:
    """Every shell command the page shows: fenced bash/console/plain blocks (continuations joined) and inline code."""
    prose, blocks = split_markdown(doc.read_text())
    lines = []
    for lang, code, _ in blocks:
        if lang in ("", "bash", "sh", "shell", "console"):
            lines += code.replace("\\\n", " ").splitlines()
    return lines + inline_code(prose)


def commands(line: str) -> list[list[str]]:
    """The line as commands (split at && | ; &), each a token list; [] when it does not parse as shell."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        tokens = list(lexer)
    except ValueError:
        return []
    result, current = [], []
    for token in tokens:
        if token and set(token) <= set("&|;"):
            result.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in result + [current] if c]


def is_placeholder(token: str) -> bool:
    return bool(re.search(r"<[^>]*>|\[|…", token))


def arguments_after(script: str, doc_commands):
    """(argv, where) for each command that runs `script`; placeholders skipped, a trailing `...` cut off."""
    for where, command in doc_commands:
        scripts = [i for i, token in enumerate(command) if token.endswith(script)]
        if not scripts:
            continue
        argv = command[scripts[0] + 1:]
        if "..." in argv:
            cut = argv.index("...")
            argv = argv[:cut - 1] if cut and argv[cut - 1].startswith("--") else argv[:cut]
        if not any(is_placeholder(token) for token in argv):
            yield argv, where


def all_commands():
    return [(f"{rel(doc)}: {line.strip()}", command)
            for doc in ALL_DOCS for line in command_lines(doc) for command in commands(line)]


def named_yaml_recipes() -> dict[str, str]:
    """YAML blocks that name their file on their first line (`# my-recipe.yaml`): recipes the docs ask you to write."""
    recipes = {}
    for doc in ALL_DOCS:
        for lang, code, _ in split_markdown(doc.read_text())[1]:
            first = code.splitlines()[0] if code else ""
            if lang in ("yaml", "yml") and re.fullmatch(r"#\s*\S+\.ya?ml\s*", first):
                recipes[first.lstrip("#").strip()] = code
    return recipes


def test_train_command_lines_parse_with_the_recipe_parser(tmp_path, monkeypatch):
    from sft_hf.run.config import parse_recipe

    written = {}
    for name, code in named_yaml_recipes().items():
        written[name] = tmp_path / name
        written[name].write_text(code)
    monkeypatch.chdir(ROOT)  # the docs' relative paths (recipes/...) are from the repository's root
    parsed, failures = 0, []
    for name, path in written.items():  # a recipe the docs show parses as a file
        try:
            parse_recipe(["--config", str(path)])
        except Exception as e:  # noqa: BLE001 - collect every failure, with where it came from
            failures.append(f"{name} (the YAML block): {type(e).__name__}: {e}")
    seen = set()
    for argv, where in arguments_after("recipes/train.py", all_commands()):
        if tuple(argv) in seen:  # the same command on several pages: parse it once
            continue
        seen.add(tuple(argv))
        argv = [str(written[a]) if a in written and not (ROOT / a).exists() else a for a in argv]
        try:
            parse_recipe(argv)
        except SystemExit as e:  # --help prints the arguments and exits 0
            if e.code not in (0, None):
                failures.append(f"{where}: exit {e.code}")
        except Exception as e:  # noqa: BLE001
            failures.append(f"{where}: {type(e).__name__}: {e}")
        parsed += 1
    assert parsed >= 5, f"only {parsed} distinct train.py command lines found"
    assert not failures, "\n".join(failures)


def eval_argument_names() -> set[str]:
    tree = ast.parse((ROOT / "sft_hf" / "evaluation" / "cli.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EvalArguments")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_evaluate_command_lines_use_existing_flags():
    known = eval_argument_names()
    assert {"model", "responses", "judge_backend", "mc_task_file"} <= known
    unknown, seen = [], 0
    for argv, where in arguments_after("recipes/evaluate.py", all_commands()):
        seen += 1
        for token in argv:
            name = token[2:].split("=")[0] if token.startswith("--") else None
            if name and name != "help" and name not in known and name.removeprefix("no_") not in known:
                unknown.append(f"{where}: --{name}")
    assert seen >= 5, f"only {seen} evaluate.py command lines found"
    assert not unknown, "\n".join(unknown)


def test_sft_hf_commands_exist():
    from sft_hf.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        assert module_file(module) is not None, f"sft-hf {name}: no module {module}"
    unknown, seen = [], 0
    for where, command in all_commands():
        for i, token in enumerate(command[:-1]):
            if token == "sft-hf" or (token == "-m" and command[i + 1] == "sft_hf"):
                name = command[i + 1] if token == "sft-hf" else (command[i + 2] if i + 2 < len(command) else "")
                if name and not name.startswith("-") and not is_placeholder(name):
                    seen += 1
                    if name not in COMMANDS:
                        unknown.append(f"{where}: {name}")
    assert seen >= 4, f"only {seen} sft-hf command lines found"
    assert not unknown, "\n".join(unknown)


def test_command_extraction():
    assert commands("pip install x && HF_HUB_OFFLINE=1 accelerate launch recipes/train.py  # the default") == [
        ["pip", "install", "x"], ["HF_HUB_OFFLINE=1", "accelerate", "launch", "recipes/train.py"]]
    found = list(arguments_after("recipes/train.py", [
        ("a", ["python", "recipes/train.py", "--config", "recipes/default.yaml"]),
        ("b", ["accelerate", "launch", "recipes/train.py", "--config", "recipes/<recipe>.yaml"]),
        ("c", ["sft-hf", "launch", "recipes/train.py", "--max_steps", "3", "..."]),
        ("d", ["python", "recipes/evaluate.py", "--model", "..."]),
    ]))
    assert found == [(["--config", "recipes/default.yaml"], "a"), (["--max_steps", "3"], "c")]


# --- what the docs list, against the code ------------------------------------------------------------------------

def test_every_recipe_key_of_sft_hf_is_in_the_flag_reference():
    from transformers import TrainingArguments

    from sft_hf.run.config import ARG_CLASSES

    own = {f.name for cls in ARG_CLASSES for f in fields(cls) if f.init} - {f.name for f in fields(TrainingArguments)}
    text = (ROOT / "docs" / "recipes.md").read_text()
    missing = sorted(name for name in own if f"`{name}`" not in text)
    assert not missing, f"docs/recipes.md (Every flag) lacks {missing}"


def names_not_in(names, text: str) -> list[str]:
    """The names `text` never shows in code: `name`, `name(...)` or `name.attr`; a longer name that starts with
    it (`InstructionTrainer` for `Instruction`) does not count."""
    return sorted(name for name in names if not re.search(rf"`{re.escape(name)}(?!\w)", text))


def test_a_name_is_found_whole_not_as_the_start_of_a_longer_one():
    text = "Train with `InstructionTrainer(model, ...)`; `exact_match` and `get_template`."
    assert names_not_in(["InstructionTrainer", "exact_match", "get_template"], text) == []
    assert names_not_in(["Instruction", "exact", "get_templ"], text) == ["Instruction", "exact", "get_templ"]


def test_every_public_name_is_in_the_library_page():
    import sft_hf

    missing = names_not_in(sft_hf.__all__, (ROOT / "docs" / "library.md").read_text())
    assert not missing, f"docs/library.md lacks {missing}"


# --- Python snippets --------------------------------------------------------------------------------------------

def python_blocks(doc: Path):
    return [(code, line) for lang, code, line in split_markdown(doc.read_text())[1] if lang in ("python", "py")]


@pytest.mark.parametrize("doc", docs_params([README, *DOC_PAGES]))
def test_python_snippets_compile(doc):
    for code, line in python_blocks(doc):
        compile(code, f"{rel(doc)}:{line}", "exec")


def test_library_snippets_import_what_sft_hf_exports():
    import sft_hf

    snippets = python_blocks(README) + python_blocks(ROOT / "docs" / "library.md")
    assert any("from sft_hf import" in code for code, _ in python_blocks(README)), "the README's library snippet"
    unresolved = []
    for code, line in snippets:
        for node in ast.walk(ast.parse(code)):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("sft_hf"):
                continue
            for alias in node.names:
                if node.module == "sft_hf":
                    ok = alias.name in sft_hf.__all__ and alias.name in defined_names(
                        module_file(sft_hf._MODULE_OF[alias.name]))
                else:
                    found = module_file(node.module)
                    ok = found is not None and alias.name in defined_names(found)
                if not ok:
                    unresolved.append(f"line {line}: from {node.module} import {alias.name}")
    assert not unresolved, "\n".join(unresolved)


# --- tables and size --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", docs_params())
def test_tables_have_as_many_cells_in_every_row(doc):
    """GitHub splits a row at every unescaped `|`, inside code spans too (`<|im_end|>` needs `<\\|im_end\\|>`)."""
    prose, _ = split_markdown(doc.read_text())
    bad, header = [], None
    for number, line in enumerate(prose.splitlines(), 1):
        if not line.startswith("|"):
            header = None
            continue
        cells = len(re.findall(r"(?<!\\)\|", line.strip()))
        if header is None:
            header = cells
        elif cells != header:
            bad.append(f"line {number}: {cells - 1} cells, the header has {header - 1}")
    assert not bad, f"{rel(doc)}:\n" + "\n".join(bad)


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text) <= README_LIMIT, f"README.md is {len(text):,} characters (at most {README_LIMIT:,})"
