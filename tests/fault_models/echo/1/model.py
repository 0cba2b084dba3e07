"""Returns its input: a healthy model for launcher start/stop tests."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor.from_dlpack("y", pb_utils.get_input_tensor_by_name(r, "x").to_dlpack())]
            )
            for r in requests
        ]
