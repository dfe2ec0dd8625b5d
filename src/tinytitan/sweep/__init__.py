"""The main job: build a model's variants, measure each with the evaluation suite, resumably."""
