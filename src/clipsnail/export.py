"""`clipsnail.export`, the ONNX export's public name (it lives in clipsnail.apps.export): `export_onnx` writes a CLIP
run's encoders as ONNX, and `OnnxClip` runs them on onnxruntime without PyTorch."""

from clipsnail.apps.export import ExportError, OnnxClip, export_onnx

__all__ = ["ExportError", "OnnxClip", "export_onnx"]
