"""``edgellm course`` (execute and render the course) and ``edgellm exercises`` (labs)."""

from __future__ import annotations

from edgellm.cli.common import (
    UsageError,
    add_json_arg,
    check_in_dir,
    check_in_file,
    check_out_dir,
    check_out_file,
)


def add_parsers(sub) -> None:
    p = sub.add_parser("course", help="execute every notebook and render the offline HTML course")
    csub = p.add_subparsers(dest="action", required=True)
    r = csub.add_parser("run", help="execute notebooks/ and solutions/, then render the course")
    r.add_argument("--out", default="build/course", help="folder of the executed, rendered course")
    r.add_argument("--fast", action="store_true", help="FAST mode (fewer tokens, samples, steps)")
    r.add_argument("--only", help="only the notebooks whose file name contains this")
    r.add_argument("--no-render", action="store_true", help="execute only")
    r.add_argument("--no-web-assets", action="store_true",
                   help="render without MathJax and the widget manager (no npm needed); "
                   "each page says so")
    add_json_arg(r)
    r.set_defaults(func=course_run)

    p = sub.add_parser("exercises", help="labs: generate exercises/ from solutions/, grade, nbgrader")
    esub = p.add_subparsers(dest="action", required=True)
    g = esub.add_parser("generate", help="write exercises/ from solutions/")
    g.add_argument("--src", default=None, help="lab sources (default: solutions/)")
    g.add_argument("--dst", default=None, help="where the exercises go (default: exercises/)")
    add_json_arg(g)
    g.set_defaults(func=exercises_generate)
    d = esub.add_parser("check-drift", help="fail if exercises/ is out of date with solutions/")
    d.add_argument("--src", default=None)
    d.add_argument("--dst", default=None)
    add_json_arg(d)
    d.set_defaults(func=exercises_drift)
    r = esub.add_parser("grade", help="execute lab notebooks and score their check cells")
    r.add_argument("notebooks", nargs="+")
    r.add_argument("--full", action="store_true", help="full mode instead of FAST")
    r.add_argument("--out", help="also write the grades to this JSON file")
    add_json_arg(r)
    r.set_defaults(func=exercises_grade)
    n = esub.add_parser("nbgrader", help="write an nbgrader source/ folder from solutions/")
    n.add_argument("out")
    add_json_arg(n)
    n.set_defaults(func=exercises_nbgrader)


def course_run(args) -> dict:
    from edgellm.course.run import course_notebooks, run_course

    check_out_dir(args.out, "--out")
    if args.only is not None and not any(args.only in p.name for p in course_notebooks()):
        names = ", ".join(p.name for p in course_notebooks())
        raise UsageError(f"--only {args.only!r} matches no notebook, so there is nothing to run; "
                         f"give part of a name, e.g. '01_' (notebooks: {names})")
    code = run_course(args.out, fast=args.fast, only=args.only, render=not args.no_render,
                      web_assets=not args.no_web_assets)
    return {"out": args.out, "failed": code != 0, "exit_code": code}


def _check_labs(args) -> None:
    """``--src`` holds solution notebooks, ``--dst`` is a folder: before anything is written."""
    if args.src is not None:
        src = check_in_dir(args.src, "--src", what="the solution notebooks (NN_topic.ipynb)")
        if not any(src.glob("[0-9][0-9]_*.ipynb")):
            raise UsageError(f"--src {args.src}: no solution notebooks (NN_topic.ipynb) in this "
                             "folder; give the folder of the lab sources (default: solutions/)")
    if args.dst is not None:
        check_out_dir(args.dst, "--dst")


def exercises_generate(args) -> dict:
    from edgellm.course.exercises import generate

    _check_labs(args)
    return {"written": [str(p) for p in generate(args.src, args.dst, quiet=args.json)]}


def exercises_drift(args) -> dict:
    from edgellm.course.exercises import drift

    _check_labs(args)
    problems = drift(args.src, args.dst)
    if not args.json:
        for line in problems:
            print(line)
        print("run `make exercises` to regenerate exercises/ from solutions/" if problems
              else "exercises/ is up to date")
    return {"drift": problems, "exit_code": 1 if problems else 0}


def exercises_grade(args) -> dict:
    import nbformat

    from edgellm.course.labs import grade
    from edgellm.records import write_json

    for path in args.notebooks:  # every file checked before the first (slow) run
        check_in_file(path, "lab notebook", suffix=".ipynb")
        try:
            nbformat.read(path, as_version=4)
        except (ValueError, KeyError, AttributeError, TypeError,  # not JSON, not a notebook
                nbformat.ValidationError) as e:
            raise UsageError(f"{path} is not a Jupyter notebook ({type(e).__name__}); give a lab "
                             "notebook, e.g. exercises/01_perplexity.ipynb") from None
    if args.out:
        check_out_file(args.out, "--out")
    grades = []
    for path in args.notebooks:
        g = grade(path, fast=not args.full)
        grades.append(g)
        if not args.json:
            print(f"{g['notebook']}: {g['score']}/{g['max_score']} check cells pass"
                  f" ({g['unanswered_stubs']} unanswered stub(s), {g['seconds']} s)")
            for row in g["checks"]:
                print(f"  cell {row['cell']:>3}  {row['status']:<7} "
                      f"{','.join(row['checks'])}  {row['detail'][:120]}")
    if args.out:
        write_json(grades, args.out)
    return {"grades": grades}


def exercises_nbgrader(args) -> dict:
    from edgellm.course.exercises import write_nbgrader_source

    check_out_dir(args.out, "OUT")
    return {"written": [str(p) for p in write_nbgrader_source(args.out)]}
