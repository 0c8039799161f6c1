"""What a build produced: one StageResult per program run, one PipelineResult per pipeline.

`PipelineResult.as_dict()` is the `--json` result of DESIGN 1.4 (the
original osbuild's shape, key order included).
"""


class StageResult:
    """The result of running one stage or the assembler."""

    def __init__(self, step, success, output, duration=0.0):
        self.name = step.name
        self.id = step.id
        self.options = step.options
        self.success = success
        self.output = output
        self.duration = duration  # seconds; not part of the JSON result

    def as_dict(self):
        """The JSON form: name, id, options, success, output."""
        return {"name": self.name, "id": self.id, "options": self.options,
                "success": self.success, "output": self.output}


class PipelineResult:
    """The result of building one pipeline (and, nested, its build pipeline)."""

    def __init__(self, pipeline):
        self.tree_id = pipeline.tree_id
        self.output_id = pipeline.output_id
        self.stages = []         # StageResults of the stages that ran, in order
        self.build = None        # the build pipeline's PipelineResult, if it has one
        self.assembler = None    # the assembler's StageResult, if it ran
        self.failed = False      # a failure that is not a program's (--output-directory)

    @property
    def success(self):
        """Whether everything that ran succeeded."""
        steps = self.stages + ([self.assembler] if self.assembler else [])
        return not self.failed and all(s.success for s in steps) and \
            (self.build is None or self.build.success)

    def as_dict(self):
        """The JSON result of DESIGN 1.4."""
        result = {"success": self.success, "stages": [s.as_dict() for s in self.stages]}
        if self.build is not None:
            result["build"] = self.build.as_dict()
        if self.assembler is not None:
            result["assembler"] = self.assembler.as_dict()
        if self.tree_id:
            result["tree_id"] = self.tree_id
        if self.output_id:
            result["output_id"] = self.output_id
        return result
